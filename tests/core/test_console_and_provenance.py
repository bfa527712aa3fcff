import hashlib
import json

from llmctl.core.provenance import PROVENANCE_FILE, write_provenance
from tests.conftest import run_llmctl


def test_errors_are_uncoloured_with_no_color_and_coloured_with_force_color(tmp_path):
    plain = run_llmctl("inspect", tmp_path / "nope", env={"NO_COLOR": "1"})
    assert b"\x1b[" not in plain.stderr
    coloured = run_llmctl("inspect", tmp_path / "nope", env={"FORCE_COLOR": "1", "NO_COLOR": None})
    assert b"\x1b[" in coloured.stderr
    assert b"llmctl inspect: error: model not found" in coloured.stderr


def test_quiet_keeps_errors(tmp_path):
    result = run_llmctl("inspect", tmp_path / "nope", "--quiet")
    assert result.returncode == 1 and b"error: model not found" in result.stderr


def test_provenance_records_inputs_with_sha256_seed_and_times(tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "a"}\n')
    write_provenance(tmp_path, command="test", inputs=[data], started_at="2026-01-01T00:00:00+00:00", seed=5)
    record = json.loads((tmp_path / PROVENANCE_FILE).read_text())
    assert record["command"] == "test" and record["seed"] == 5
    assert record["inputs"][0]["sha256"] == hashlib.sha256(b'{"text": "a"}\n').hexdigest()
    assert record["started_at"] <= record["finished_at"]
    assert record["llmctl_version"] and record["versions"]["python"]
