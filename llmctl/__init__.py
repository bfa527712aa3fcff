"""llmctl: one command-line toolkit for the life of a language model."""

__version__ = "0.1.0"
