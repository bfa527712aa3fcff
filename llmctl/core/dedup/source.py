"""Input for dedup and filter: records whose text field is a non-empty string, readable twice."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from llmctl.core.io import ReadStats, Record, open_input, read_records
from llmctl.core.io.jsonl import STDIN, is_text_path, text_extractor


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

    @property
    def lines_pass_through(self) -> bool:
        """Whether :meth:`kept_lines` can give the kept records as their original JSONL lines."""
        return self.path != STDIN and not self.whole_file and not is_text_path(self.path)

    def kept_lines(self, line_numbers: Iterable[int]) -> Iterator[str]:
        """Pass two without parsing: the input lines at ``line_numbers`` (ascending, 1-based, as
        ``Record.line`` counts them), as they are in the file minus the line ending. Every field passes
        through untouched, byte for byte, and no JSON is parsed or written again."""
        wanted = iter(line_numbers)
        target = next(wanted, None)
        if target is None:
            return
        with open_input(self.path) as stream:
            for line_no, raw in enumerate(stream, start=1):
                if line_no == target:
                    yield raw.decode("utf-8").rstrip("\r\n")
                    target = next(wanted, None)
                    if target is None:
                        return
