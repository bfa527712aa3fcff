"""The one writer of records: stdout (flushed per record) or a file written atomically."""

from __future__ import annotations

import gzip
import io
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from llmctl.core.io.atomic import atomic_output

STDOUT = "-"


def dumps(obj: Any) -> str:
    """One compact JSON line; non-ASCII kept as is, key order kept, so pass-through fields are untouched."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class RecordWriter:
    def __init__(self, stream: IO[str], *, flush_each: bool) -> None:
        self._stream = stream
        self._flush_each = flush_each
        self.count = 0

    def write(self, obj: dict[str, Any]) -> None:
        self.write_line(dumps(obj))

    def write_line(self, line: str) -> None:
        """One record already serialised as a JSON object on one line (e.g. an input line passed through
        byte for byte), without its newline."""
        self._stream.write(line + "\n")
        if self._flush_each:
            self._stream.flush()
        self.count += 1


@contextmanager
def open_writer(output: str | Path | None, *, force: bool = False) -> Iterator[RecordWriter]:
    """Records to stdout (``None`` or ``-``), or to a file that appears only when the command succeeds.

    A file output ending in ``.gz`` or ``.zst`` is compressed. An existing file is refused unless ``force``.
    """
    if output is None or str(output) == STDOUT:
        writer = RecordWriter(sys.stdout, flush_each=True)
        yield writer
        sys.stdout.flush()
        return
    path = Path(output)
    with atomic_output(path, force=force, is_dir=False) as tmp:
        with _open_text(tmp, path.suffix.lower()) as stream:
            yield RecordWriter(stream, flush_each=False)


@contextmanager
def _open_text(path: Path, suffix: str) -> Iterator[IO[str]]:
    file = None
    if suffix == ".gz":
        # mtime=0 and no file name in the header: the same records give the same bytes (determinism).
        file = open(path, "wb")  # noqa: SIM115 - closed below, after the gzip trailer is written
        raw: IO[bytes] = gzip.GzipFile(filename="", mode="wb", fileobj=file, mtime=0)
    elif suffix in (".zst", ".zstd"):
        import zstandard

        raw = zstandard.ZstdCompressor().stream_writer(open(path, "wb"), closefd=True)  # noqa: SIM115
    else:
        raw = open(path, "wb")  # noqa: SIM115
    stream = io.TextIOWrapper(raw, encoding="utf-8", newline="\n")
    try:
        yield stream
    finally:
        stream.close()
        if file is not None:
            file.close()
