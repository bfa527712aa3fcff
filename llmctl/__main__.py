"""`python -m llmctl` runs the CLI."""

from llmctl.cli import main

if __name__ == "__main__":
    main()
