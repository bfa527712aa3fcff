import gzip
import io
import json
import sys

import pytest
import zstandard

from llmctl.core.errors import InputDataError, UsageError
from llmctl.core.io import ReadStats, read_records, resolve_input

RECORDS = [{"id": 1, "text": "héllo 👋", "meta": {"lang": "fr"}}, {"id": 2, "text": "world", "meta": {}}]


def _jsonl(records) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst", ".data"])
def test_plain_and_compressed_jsonl_read_the_same_records(tmp_path, suffix):
    data = _jsonl(RECORDS)
    if suffix.endswith(".gz"):
        data = gzip.compress(data)
    elif suffix.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path = tmp_path / f"in{suffix}"
    path.write_bytes(data)
    got = list(read_records(str(path), text_field="text"))
    assert [r.data for r in got] == RECORDS
    assert [r.text for r in got] == ["héllo 👋", "world"]
    assert [r.line for r in got] == [1, 2]


def test_stdin_is_read_with_dash_and_compressed_stdin_is_detected(monkeypatch):
    data = gzip.compress(_jsonl(RECORDS))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    got = list(read_records("-", text_field="text"))
    assert [r.text for r in got] == ["héllo 👋", "world"]
    assert got[0].where == "<stdin>:1"


def test_input_defaults_to_stdin_only_when_it_is_piped(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    assert resolve_input(None) == "-"
    assert resolve_input("x.jsonl") == "x.jsonl"

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Tty())
    with pytest.raises(UsageError, match="no INPUT"):
        resolve_input(None)


def test_dotted_text_field(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(_jsonl([{"meta": {"body": "deep"}}]))
    assert [r.text for r in read_records(str(path), text_field="meta.body")] == ["deep"]


def test_text_files_give_one_record_per_non_empty_line_or_one_for_the_whole_file(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text("first line\n\nsecond line\r\n", encoding="utf-8")
    lines = list(read_records(str(path), text_field="text"))
    assert [(r.line, r.text) for r in lines] == [(1, "first line"), (3, "second line")]
    assert lines[0].data == {"text": "first line"}
    whole = list(read_records(str(path), text_field="text", whole_file=True))
    assert [r.text for r in whole] == ["first line\n\nsecond line\r\n"]


def test_blank_jsonl_lines_are_ignored(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"text": "a"}\n\n   \n{"text": "b"}\n')
    assert [r.line for r in read_records(str(path), text_field="text")] == [1, 4]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"text": "a"', "malformed JSON"),
        (b'["a", "b"]', "expected a JSON object, got list"),
        (b'{"body": "a"}', "missing field 'text'"),
        (b'{"text": 5}', "field 'text' is int"),
        (b'{"text": "caf\xe9"}', "invalid UTF-8"),
    ],
)
def test_bad_line_stops_with_exit_code_3_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n' + line + b"\n")
    with pytest.raises(InputDataError) as err:
        list(read_records(str(path), text_field="text"))
    assert err.value.exit_code == 3
    assert f"{path}:2:" in err.value.message
    assert message in err.value.message


def test_skip_bad_lines_counts_what_it_skips(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "a"}\nnot json\n{"x": 1}\n{"text": "b"}\n\xff\xfe\n')
    stats = ReadStats()
    got = list(read_records(str(path), text_field="text", skip_bad_lines=True, stats=stats))
    assert [r.text for r in got] == ["a", "b"]
    assert (stats.records, stats.skipped) == (2, 3)
    assert f"{path}:2:" in stats.first_errors[0]
    warnings = []
    stats.report(warnings.append)
    assert "skipped 3 bad line(s)" in warnings[0]


def test_missing_input_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="input file not found"):
        list(read_records(str(tmp_path / "nope.jsonl")))


def test_extract_function_validates_other_fields(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(_jsonl([{"messages": [1]}]))

    def extract(record):
        return None, "messages must be objects"

    with pytest.raises(InputDataError, match="in.jsonl:1: messages must be objects"):
        list(read_records(str(path), extract=extract))
