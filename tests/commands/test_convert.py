"""llmctl convert through the CLI: round trips, provenance, refusals, and interrupted runs."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmctl.core.io.atomic import TMP_MARK
from tests.conftest import REPO, _env


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model, tmp_path_factory):
    from llmctl.core.models.gguf_export import export_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    export_gguf(tiny_model, path, outtype="f32")
    return path


def _logits(model_dir, ids):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model(torch.tensor([ids])).logits


def test_hf_to_gguf_to_hf_through_the_cli_gives_identical_logits(cli, tiny_model, tmp_path):
    gguf = tmp_path / "tiny.gguf"
    result = cli("convert", tiny_model, "--to", "gguf", "--outtype", "f32", "-o", gguf, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["outtype"] == "f32"
    back = tmp_path / "back"
    result = cli("convert", gguf, "-o", back, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["architecture"] == "llama" and summary["output"] == str(back)
    ids = [1, 72, 101, 108, 108, 111, 2, 33, 200, 258]
    assert torch.equal(_logits(tiny_model, ids), _logits(back, ids))
    provenance = json.loads((back / "llmctl.json").read_text())
    assert provenance["command"] == "convert"
    assert provenance["inputs"][0]["path"] == str(gguf.resolve())
    config = json.loads((back / "config.json").read_text())
    assert "quantization_config" not in config


def test_converting_to_the_same_format_is_a_usage_error(cli, tiny_model, tmp_path):
    result = cli("convert", tiny_model, "--to", "hf", "-o", tmp_path / "x")
    assert result.exit_code == 2 and "already in hf format" in result.stderr


def test_existing_gguf_output_is_refused_without_force(cli, tiny_model, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep")
    result = cli("convert", tiny_model, "-o", out)
    assert result.exit_code == 2 and out.read_bytes() == b"keep"
    assert cli("convert", tiny_model, "-o", out, "--force", "--quiet").exit_code == 0
    assert out.read_bytes()[:4] == b"GGUF"


def test_a_file_that_is_not_gguf_is_refused(cli, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file")
    result = cli("convert", fake, "-o", tmp_path / "out")
    assert result.exit_code == 1 and "not a GGUF model" in result.stderr


def _start_convert(source, out):
    cmd = [sys.executable, "-m", "llmctl", "convert", str(source), "-o", str(out)]
    # A shell runs background jobs with SIGINT ignored, and children inherit that: give the child the
    # default disposition, as a terminal's foreground process has, so Ctrl-C behaviour is what is tested.
    return subprocess.Popen(
        cmd, cwd=REPO, env=_env(None), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip


def _wait_for_temporary(parent, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(TMP_MARK in p.name for p in parent.iterdir()):
            return True
        if proc.poll() is not None:
            return False  # finished before its temporary was seen (a fast run on a loaded machine)
        time.sleep(0.01)
    pytest.fail("convert never created its temporary output")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_convert_leaves_nothing_behind(tiny_gguf, tmp_path, sig, code):
    # The tiny model converts in milliseconds: on a loaded machine the signal can land after the rename.
    # Then the output must be complete (and nothing else left); try again until a signal lands in time.
    for attempt in range(10):
        parent = tmp_path / str(attempt)
        parent.mkdir()
        out = parent / "out"
        proc = _start_convert(tiny_gguf, out)
        if _wait_for_temporary(parent, proc):
            proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
        if proc.returncode == 0:
            assert [p.name for p in parent.iterdir()] == ["out"] and (out / "config.json").is_file()
            continue
        assert proc.returncode == code, stderr.decode()
        assert list(parent.iterdir()) == []  # no output, and the temporary was removed
        return
    pytest.fail("the signal never arrived before convert finished, in 10 tries")


def test_a_killed_convert_leaves_no_complete_looking_output(tiny_gguf, tmp_path):
    out = tmp_path / "out"
    proc = _start_convert(tiny_gguf, out)
    if not _wait_for_temporary(tmp_path, proc):
        pytest.skip("convert finished before it could be killed (loaded machine)")
    proc.kill()  # SIGKILL: nothing can clean up, but nothing may look finished either
    proc.communicate(timeout=60)
    assert not out.exists()
    assert all(p.name.startswith(".") and TMP_MARK in p.name for p in tmp_path.iterdir())
