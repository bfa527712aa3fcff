"""Reading and writing records and files the way every llmctl command does."""

from llmctl.core.io.atomic import atomic_output, check_output
from llmctl.core.io.fields import get_field, has_field, set_field
from llmctl.core.io.jsonl import ReadStats, Record, open_input, read_records, resolve_input
from llmctl.core.io.writer import RecordWriter, open_writer

__all__ = [
    "ReadStats",
    "Record",
    "RecordWriter",
    "atomic_output",
    "check_output",
    "get_field",
    "has_field",
    "open_input",
    "open_writer",
    "read_records",
    "resolve_input",
    "set_field",
]
