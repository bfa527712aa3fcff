"""completions/ holds scripts generated from the app; they must match it and work in the shells."""

import shutil
import subprocess

import pytest

from llmctl.core.completions import GENERATORS, SHELLS
from tests.conftest import REPO


@pytest.mark.parametrize("shell", sorted(SHELLS))
def test_checked_in_completion_scripts_are_up_to_date(shell):
    path = REPO / "completions" / SHELLS[shell]
    assert path.is_file(), f"{path} is missing: run `make completions`"
    assert path.read_text(encoding="utf-8") == GENERATORS[shell](), f"{path} is stale: run `make completions`"


def _bash_complete(words: list[str]) -> list[str]:
    script = REPO / "completions" / "llmctl.bash"
    line = " ".join(f"'{w}'" for w in words)
    program = (
        f"source {script}\n"
        f"COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}\n"
        '_llmctl; printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    done = subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=True)
    return done.stdout.split()


def test_bash_completes_commands_options_and_choices():
    assert {"convert", "init", "inspect", "tokenize"} <= set(_bash_complete(["llmctl", ""]))
    assert "--outtype" in _bash_complete(["llmctl", "convert", "--o"])
    assert _bash_complete(["llmctl", "convert", "x", "--outtype", ""]) == ["f32", "f16", "q8_0"]
    assert "llama-tiny" in _bash_complete(["llmctl", "init", "--preset", ""])


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh not installed")
def test_zsh_script_parses():
    subprocess.run(["zsh", "-n", str(REPO / "completions" / "llmctl.zsh")], check=True)


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish not installed")
def test_fish_script_parses():
    subprocess.run(["fish", "--no-execute", str(REPO / "completions" / "llmctl.fish")], check=True)
