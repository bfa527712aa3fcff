"""Input for dedup and filter: records whose text field is a non-empty string, readable twice."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from llmctl.core.io import ReadStats, Record, read_records
from llmctl.core.io.jsonl import STDIN, text_extractor


def nonempty_text(text_field: str) -> Callable[[dict], tuple[Any, str | None]]:
    """An ``extract`` for ``read_records``: the field's string value; missing, non-string or blank is bad."""
    return text_extractor(text_field, allow_blank=False)


@dataclass
class TwoPassInput:
    """Records of one input, iterable twice: a file is re-read; stdin is kept in memory on the first pass."""

    path: str
    text_field: str = "text"
    skip_bad_lines: bool = False
    whole_file: bool = False
    stats: ReadStats = field(default_factory=ReadStats)
    _kept: list[Record] | None = None

    def _read(self, stats: ReadStats) -> Iterator[Record]:
        return read_records(
            self.path, extract=nonempty_text(self.text_field), skip_bad_lines=self.skip_bad_lines,
            whole_file=self.whole_file, stats=stats,
        )  # fmt: skip

    def first_pass(self) -> Iterator[Record]:
        if self.path != STDIN:
            yield from self._read(self.stats)
            return
        self._kept = []
        for record in self._read(self.stats):
            self._kept.append(record)
            yield record

    def second_pass(self) -> Iterator[Record]:
        if self._kept is not None:
            yield from self._kept
        else:
            yield from self._read(ReadStats())
