"""The rules every command keeps: exit codes, one-line errors, --help examples, --config, --version."""

import importlib
import re

import pytest

from llmctl import __version__
from llmctl.cli import COMMANDS as REGISTERED
from llmctl.cli import app
from tests.conftest import run_llmctl

COMMANDS = sorted(REGISTERED)


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"llmctl {__version__}"


def test_top_level_help_lists_every_command(cli):
    result = cli("--help")
    assert result.exit_code == 0
    for name in COMMANDS:
        assert re.search(rf"^\s+{name}\s", result.stdout, re.M), name


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_help_ends_with_a_runnable_example(cli, name):
    result = cli(name, "--help")
    assert result.exit_code == 0
    tail = result.stdout[result.stdout.index("Examples:") :]
    assert re.search(rf"^\s+llmctl {name} \S", tail, re.M)
    # examples are printed whole, one per line, however narrow the terminal (so they can be pasted)
    module = importlib.import_module(REGISTERED[name])
    examples = [line.strip() for line in module.EPILOG.splitlines() if line.strip().startswith("llmctl ")]
    shown = [line.strip() for line in tail.splitlines()]
    assert examples and all(example in shown for example in examples)


def test_usage_error_is_one_line_with_exit_code_2():
    result = run_llmctl("init", "-o", "x", "--no-such-flag")
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("llmctl init: error: No such option: --no-such-flag")
    assert result.stdout == b""


def test_missing_model_is_a_one_line_error_without_traceback(tmp_path):
    result = run_llmctl("inspect", tmp_path / "no-such-model")
    assert result.returncode == 1
    stderr = result.stderr.decode()
    assert stderr.strip().count("\n") == 0
    assert stderr.startswith("llmctl inspect: error: model not found:")
    assert "Traceback" not in stderr


def test_debug_flag_and_env_show_the_traceback(tmp_path):
    for args, env in (((tmp_path / "nope", "--debug"), None), ((tmp_path / "nope",), {"LLMCTL_DEBUG": "1"})):
        result = run_llmctl("inspect", *args, env=env)
        assert result.returncode == 1
        assert "Traceback" in result.stderr.decode()
        assert result.stderr.decode().strip().splitlines()[-1].startswith("llmctl inspect: error:")


def test_a_directory_without_config_is_not_a_model(cli, tmp_path):
    result = cli("inspect", tmp_path)
    assert result.exit_code == 1
    assert "has no config.json" in result.stderr


def test_config_file_values_are_defaults_and_flags_win(cli, tmp_path):
    config = tmp_path / "init.yaml"
    config.write_text("preset: qwen2-tiny\nseed: 7\n")
    result = cli("init", "--config", config, "-o", tmp_path / "a", "--json")
    assert result.exit_code == 0, result.stderr
    assert '"preset": "qwen2-tiny"' in result.stdout and '"seed": 7' in result.stdout
    result = cli("init", "--config", config, "--seed", "3", "-o", tmp_path / "b", "--json")
    assert '"preset": "qwen2-tiny"' in result.stdout and '"seed": 3' in result.stdout


def test_config_file_with_unknown_key_is_a_usage_error(cli, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("sed: 7\n")
    result = cli("init", "--config", config, "-o", tmp_path / "a")
    assert result.exit_code == 2
    assert "unknown option(s) sed" in result.stderr
    assert not (tmp_path / "a").exists()


def test_config_values_are_validated_like_flags(cli, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("dtype: float8\n")
    result = cli("init", "--config", config, "-o", tmp_path / "a")
    assert result.exit_code == 2


def test_all_commands_share_the_same_option_names():
    import typer.main

    group = typer.main.get_command(app)
    for name in COMMANDS:
        opts = {o for p in group.commands[name].params for o in getattr(p, "opts", [])}
        for shared in ("--quiet", "--debug", "--config"):
            assert shared in opts, (name, shared)


def test_starting_the_cli_does_not_import_torch_or_transformers():
    import subprocess
    import sys

    code = (
        "import sys; from llmctl.cli import app; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_running_one_command_imports_only_that_command_module():
    import subprocess
    import sys

    code = (
        "import sys, llmctl.cli\n"
        "try:\n    llmctl.cli.main(['dedup', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('llmctl.commands.')), file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--method" in done.stdout
    assert done.stderr.strip() == "['llmctl.commands.dedup']"
