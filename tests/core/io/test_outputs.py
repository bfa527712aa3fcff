import gzip
import json

import pytest

from llmctl.core.errors import OutputExistsError
from llmctl.core.io import atomic_output, open_writer
from llmctl.core.io.atomic import TMP_MARK


def _leftovers(directory):
    return [p.name for p in directory.iterdir() if TMP_MARK in p.name or ".llmctl-old-" in p.name]


def test_directory_appears_only_after_success(tmp_path):
    out = tmp_path / "model"
    with atomic_output(out) as tmp:
        (tmp / "config.json").write_text("{}")
        assert not out.exists()
    assert (out / "config.json").read_text() == "{}"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt, SystemExit])
def test_failure_or_interrupt_leaves_nothing_behind(tmp_path, exc):
    out = tmp_path / "model"
    with pytest.raises(exc):
        with atomic_output(out) as tmp:
            (tmp / "half-written").write_text("x")
            raise exc()
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_without_force_and_replaced_with_it(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(OutputExistsError, match="--force"):
        with atomic_output(out):
            pytest.fail("must refuse before any work")
    assert (out / "old").exists()
    with atomic_output(out, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert _leftovers(tmp_path) == []


def test_file_output_replaces_a_file_atomically_with_force(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    with atomic_output(out, force=True, is_dir=False) as tmp:
        tmp.write_text("new\n")
    assert out.read_text() == "new\n"


def test_writer_to_file_is_atomic_and_compresses_deterministically(tmp_path):
    records = [{"id": i, "text": "é" * i} for i in range(3)]
    paths = []
    for name in ("a.jsonl.gz", "b.jsonl.gz"):
        with open_writer(tmp_path / name) as w:
            for r in records:
                w.write(r)
        paths.append(tmp_path / name)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    lines = gzip.decompress(paths[0].read_bytes()).decode().splitlines()
    assert [json.loads(line) for line in lines] == records
    assert lines[1] == '{"id":1,"text":"é"}'  # compact, non-ASCII kept


def test_writer_failure_leaves_no_file(tmp_path):
    out = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError):
        with open_writer(out) as w:
            w.write({"a": 1})
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
