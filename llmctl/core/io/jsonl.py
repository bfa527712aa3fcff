"""The one reader of records for every data command.

Inputs: a path or ``-`` (standard input, also the default when stdin is not a terminal); plain, gzip or
zstandard compressed (detected by magic bytes, so compressed stdin works too); JSONL (one object per line)
or plain text (``.txt``: one document per non-empty line, or the whole file with ``whole_file=True``).

Bad input is never silently dropped: a malformed line, a value that is not an object, a missing or
non-string text field, or invalid UTF-8 raises :class:`InputDataError` naming the file and line, unless
``skip_bad_lines`` is set, in which case the line is counted in :class:`ReadStats` and reading goes on.
Blank lines in JSONL are ignored (a trailing newline is not an error).
"""

from __future__ import annotations

import gzip
import io
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from llmctl.core.errors import InputDataError, UsageError
from llmctl.core.io.fields import get_field

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
TEXT_SUFFIXES = {".txt", ".text"}
STDIN = "-"


@dataclass
class Record:
    """One input record: the parsed object (passed through untouched) and where it came from."""

    data: dict[str, Any]
    source: str
    line: int
    text: Any = None  # the value of the text field (or of ``extract``), when one was asked for

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass
class ReadStats:
    """What the reader saw; commands put ``skipped`` into their summaries."""

    records: int = 0
    skipped: int = 0
    first_errors: list[str] = field(default_factory=list)

    def skip(self, message: str) -> None:
        self.skipped += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(message)

    def report(self, warn) -> None:
        """Tell the user how many lines were skipped (``warn`` is ``ui.warn``)."""
        if self.skipped:
            examples = "; ".join(self.first_errors[:3])
            warn(f"skipped {self.skipped} bad line(s) (--skip-bad-lines); first: {examples}")


def resolve_input(path: str | None) -> str:
    """The INPUT argument: as given, or ``-`` when omitted and stdin is piped."""
    if path is not None and path != "":
        return path
    if not sys.stdin.isatty():
        return STDIN
    raise UsageError("no INPUT given: pass a file, or '-' to read standard input")


def display_name(path: str) -> str:
    return "<stdin>" if path == STDIN else str(path)


def open_input(path: str) -> IO[bytes]:
    """A binary stream over the (decompressed) content of ``path`` or stdin."""
    if path == STDIN:
        raw: IO[bytes] = sys.stdin.buffer
    else:
        p = Path(path)
        if not p.exists():
            raise UsageError(f"input file not found: {path}")
        if p.is_dir():
            raise UsageError(f"input is a directory, not a file: {path}")
        raw = open(p, "rb")  # noqa: SIM115 - closed by the caller
    stream = raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(raw)  # type: ignore[arg-type]
    head = stream.peek(4)[:4]
    if head.startswith(GZIP_MAGIC):
        return gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[return-value]
    if head.startswith(ZSTD_MAGIC):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(stream, closefd=True))
    return stream


def is_text_path(path: str) -> bool:
    """Whether ``path`` is read as plain text (one document per line) rather than JSONL, by its suffix."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    while suffixes and suffixes[-1] in (".gz", ".zst", ".zstd"):
        suffixes.pop()
    return bool(suffixes) and suffixes[-1] in TEXT_SUFFIXES


def read_records(
    path: str,
    *,
    text_field: str | None = None,
    skip_bad_lines: bool = False,
    whole_file: bool = False,
    input_format: str = "auto",
    stats: ReadStats | None = None,
    extract: Callable[[dict], tuple[Any, str | None]] | None = None,
) -> Iterator[Record]:
    """Yield the records of ``path`` in order.

    ``text_field``: when given, every record must have a string at that dotted path; it is put in
    ``Record.text``. For text input the line becomes ``{<text_field or "text">: line}``.
    ``input_format``: ``auto`` (by suffix: .txt/.text are text, everything else JSONL), ``jsonl`` or ``text``.
    ``extract``: instead of a text field, a function ``record -> (value, error message or None)`` whose value
    goes into ``Record.text`` (e.g. a chat's ``messages``); its errors are handled like any bad line.
    """
    stats = stats if stats is not None else ReadStats()
    if extract is None and text_field is not None:
        extract = text_extractor(text_field)
    name = display_name(path)
    as_text = input_format == "text" or whole_file or (input_format == "auto" and is_text_path(path))
    stream = open_input(path)
    try:
        lines = _text_lines(stream, name, whole_file, text_field or "text") if as_text else None
        source = lines if lines is not None else _jsonl_lines(stream, name)
        for line_no, obj, error in source:
            if error is None and extract is not None:
                text, error = extract(obj)
            else:
                text = None
            if error is not None:
                message = f"{name}:{line_no}: {error}"
                if not skip_bad_lines:
                    raise InputDataError(message + " (use --skip-bad-lines to skip such lines)")
                stats.skip(message)
                continue
            stats.records += 1
            yield Record(obj, name, line_no, text)
    finally:
        if path != STDIN:
            stream.close()


def _jsonl_lines(stream: IO[bytes], name: str) -> Iterator[tuple[int, Any, str | None]]:
    for line_no, raw in enumerate(stream, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield line_no, None, f"invalid UTF-8 (byte {e.start})"
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield line_no, None, f"malformed JSON: {e.msg} at column {e.colno}"
            continue
        if not isinstance(obj, dict):
            yield line_no, None, f"expected a JSON object, got {type(obj).__name__}"
            continue
        yield line_no, obj, None


def _text_lines(
    stream: IO[bytes], name: str, whole_file: bool, key: str
) -> Iterator[tuple[int, Any, str | None]]:
    if whole_file:
        data = stream.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line_no = data[: e.start].count(b"\n") + 1
            yield line_no, None, f"invalid UTF-8 (byte {e.start} of the file)"
            return
        yield 1, _nest(key, text), None
        return
    for line_no, raw in enumerate(stream, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield line_no, None, f"invalid UTF-8 (byte {e.start})"
            continue
        line = line.rstrip("\r\n")
        if line.strip():
            yield line_no, _nest(key, line), None


def _nest(path: str, value: str) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    node = obj
    keys = path.split(".")
    for key in keys[:-1]:
        node[key] = {}
        node = node[key]
    node[keys[-1]] = value
    return obj


def text_extractor(text_field: str, *, allow_blank: bool = True) -> Callable[[dict], tuple[Any, str | None]]:
    """An ``extract`` for :func:`read_records`: the string at ``text_field``; missing or non-string (and,
    unless ``allow_blank``, empty or whitespace-only) is a bad line."""

    def extract(obj: dict) -> tuple[Any, str | None]:
        try:
            value = get_field(obj, text_field)
        except KeyError:
            hint = " (use --text-field to name another)" if text_field == "text" else ""
            return None, f"missing field {text_field!r}{hint}"
        if not isinstance(value, str):
            return None, f"field {text_field!r} is {type(value).__name__}, expected a string"
        if not allow_blank and not value.strip():
            return None, f"field {text_field!r} is empty"
        return value, None

    return extract
