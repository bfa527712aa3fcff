"""Training records → token ids and labels, with the loss only where the model should learn.

Formats are detected from a record's fields (the first record decides; every later record must match):

| format | fields | trained tokens |
|---|---|---|
| ``text`` | ``text`` (or ``--text-field``) | all |
| ``prompt-completion`` | ``prompt``, ``completion`` | the completion and EOS |
| ``messages`` | ``messages`` (OpenAI roles), rendered by the tokenizer's chat template | assistant turns |
| ``alpaca`` | ``instruction``, optional ``input``, ``output`` | the output and EOS |
| ``preference`` | ``prompt``, ``chosen``, ``rejected`` | chosen and rejected completions |

``--train-on-prompt`` trains on every token instead. Labels follow the Hugging Face convention (same length
as ``input_ids``, ``-100`` = no loss); the shift to next-token targets happens in :mod:`batching`, per
document, so packed documents never predict each other.

An example whose labels are all masked (a template that does not match, a prompt longer than
``--max-length``) is an input error naming its file and line, never a silent zero loss.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from llmctl.core.errors import InputDataError, UsageError
from llmctl.core.io import Record, get_field, has_field

IGNORE = -100
FORMATS = ("auto", "text", "prompt-completion", "messages", "alpaca", "preference")

# The Stanford Alpaca prompt templates (with and without an input).
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class Example:
    """One tokenized training sequence; ``labels[i] == -100`` where no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    source: str = ""

    @property
    def trained(self) -> int:
        """Tokens the loss is taken on. The first token is never predicted (nothing precedes it)."""
        return sum(1 for x in self.labels[1:] if x != IGNORE)


@dataclass
class PreferenceExample:
    """A prompt with a preferred (chosen) and a dispreferred (rejected) completion, each a full sequence."""

    chosen: Example
    rejected: Example
    source: str = ""


@dataclass
class DataStats:
    records: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    skipped: int = 0
    format: str = ""
    notes: list[str] = field(default_factory=list)


def detect_format(data: dict[str, Any], text_field: str = "text") -> str:
    """The format a record's fields say it is in, or an error listing what was expected."""
    if "chosen" in data and "rejected" in data:
        return "preference"
    if "messages" in data:
        return "messages"
    if "prompt" in data and "completion" in data:
        return "prompt-completion"
    if "instruction" in data and "output" in data:
        return "alpaca"
    if has_field(data, text_field):
        return "text"
    raise InputDataError(
        f"cannot tell the record's format from its fields {sorted(data)}: expected {text_field!r}, "
        "prompt/completion, messages, instruction/input/output or prompt/chosen/rejected"
    )


class Tokenize:
    """Turns records of one format into :class:`Example` / :class:`PreferenceExample` objects."""

    def __init__(
        self,
        tokenizer,
        *,
        fmt: str = "auto",
        text_field: str = "text",
        train_on_prompt: bool = False,
        max_length: int | None = None,
        add_eos: bool = True,
    ) -> None:
        if fmt not in FORMATS:
            raise UsageError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
        self.tok = tokenizer
        self.fmt = fmt
        self.text_field = text_field
        self.train_on_prompt = train_on_prompt
        self.max_length = max_length
        self.eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
        self.stats = DataStats()

    # -- pieces ---------------------------------------------------------------------------------------------
    def _ids(self, text: str, *, special: bool) -> list[int]:
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def _prompt_completion(self, prompt: str, completion: str, where: str) -> Example:
        prompt_ids = self._ids(prompt, special=True)
        completion_ids = self._ids(completion, special=False) + self.eos
        mask = prompt_ids if self.train_on_prompt else [IGNORE] * len(prompt_ids)
        return Example(prompt_ids + completion_ids, list(mask) + completion_ids, where)

    def _messages(self, messages: Any, where: str) -> Example:
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise InputDataError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        if not getattr(self.tok, "chat_template", None):
            raise InputDataError(
                f"{where}: messages records need a tokenizer with a chat template; this one has none"
            )
        render = self.tok.apply_chat_template
        full = render(messages, tokenize=False)
        spans = []  # (start_char, end_char) of each assistant turn in the rendered text
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            before = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
            upto = render(messages[: i + 1], tokenize=False)
            if not (full.startswith(before) and full.startswith(upto) and len(upto) > len(before)):
                raise InputDataError(
                    f"{where}: the chat template does not render turns incrementally, so assistant tokens "
                    "cannot be located; use --train-on-prompt or prompt/completion records"
                )
            spans.append((len(before), len(upto)))
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        if self.train_on_prompt:
            return Example(ids, list(ids), where)
        labels = [IGNORE] * len(ids)
        for k, (start, _end) in enumerate(enc["offset_mapping"]):
            if any(a <= start < b for a, b in spans):
                labels[k] = ids[k]
        return Example(ids, labels, where)

    def _truncate(self, ex: Example) -> Example:
        if self.max_length is not None and len(ex.input_ids) > self.max_length:
            self.stats.truncated += 1
            ex = Example(ex.input_ids[: self.max_length], ex.labels[: self.max_length], ex.source)
        return ex

    def _check(self, ex: Example) -> Example:
        if ex.trained == 0:
            why = (
                " after truncation to --max-length"
                if self.max_length and len(ex.input_ids) >= self.max_length
                else ""
            )
            raise InputDataError(
                f"{ex.source}: every label of this example is masked{why}, so it would train on nothing "
                "(check the format, the chat template, or use --train-on-prompt)"
            )
        return ex

    # -- records --------------------------------------------------------------------------------------------
    def example(self, record: Record) -> Example | PreferenceExample:
        data = record.data if isinstance(record.data, dict) else {}
        where = f"{record.source}:{record.line}"
        fmt = detect_format(data, self.text_field) if self.fmt == "auto" else self.fmt
        if not self.stats.format:
            self.stats.format = fmt
        elif fmt != self.stats.format:
            raise InputDataError(
                f"{where}: this record is in {fmt} format but earlier ones are {self.stats.format}"
            )
        try:
            if fmt == "text":
                text = record.text if record.text is not None else get_field(data, self.text_field)
                ids = self._ids(_str(text, where, self.text_field), special=True) + self.eos
                ex: Example | PreferenceExample = Example(ids, list(ids), where)
            elif fmt == "prompt-completion":
                ex = self._prompt_completion(
                    _str(data["prompt"], where, "prompt"),
                    _str(data["completion"], where, "completion"),
                    where,
                )
            elif fmt == "alpaca":
                inp = data.get("input") or ""
                template = ALPACA_WITH_INPUT if inp else ALPACA_NO_INPUT
                prompt = template.format(
                    instruction=_str(data["instruction"], where, "instruction"), input=inp
                )
                ex = self._prompt_completion(prompt, _str(data["output"], where, "output"), where)
            elif fmt == "messages":
                ex = self._messages(data["messages"], where)
            else:
                ex = self._preference(data, where)
        except KeyError as e:
            raise InputDataError(f"{where}: missing field {e.args[0]!r} for {fmt} records") from None
        if isinstance(ex, PreferenceExample):
            ex = PreferenceExample(
                self._check(self._truncate(ex.chosen)), self._check(self._truncate(ex.rejected)), where
            )
        else:
            ex = self._check(self._truncate(ex))
        return ex

    def _preference(self, data: dict[str, Any], where: str) -> PreferenceExample:
        for side in ("prompt", "chosen", "rejected"):
            if data.get(side) in (None, "", []):
                raise InputDataError(
                    f"{where}: preference record is missing {side!r} (needs prompt, chosen and rejected)"
                )
        prompt = data["prompt"]
        if isinstance(prompt, list):  # a conversation: render it with the chat template, assistant to follow
            if not getattr(self.tok, "chat_template", None):
                raise InputDataError(f"{where}: a messages prompt needs a tokenizer with a chat template")
            text = self.tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            prompt_ids = self._ids(text, special=False)
        else:
            prompt_ids = self._ids(_str(prompt, where, "prompt"), special=True)
        sides = []
        for side in ("chosen", "rejected"):
            value = data[side]
            if isinstance(value, dict):  # {"role": "assistant", "content": ...}
                value = value.get("content")
            ids = self._ids(_str(value, where, side), special=False) + self.eos
            mask = prompt_ids if self.train_on_prompt else [IGNORE] * len(prompt_ids)
            sides.append(Example(prompt_ids + ids, list(mask) + ids, where))
        return PreferenceExample(sides[0], sides[1], where)

    def all(self, records: Iterable[Record], *, skip_bad_lines: bool = False) -> list:
        out = []
        for record in records:
            self.stats.records += 1
            try:
                ex = self.example(record)
            except InputDataError:
                if not skip_bad_lines:
                    raise
                self.stats.skipped += 1
                continue
            out.append(ex)
            for e in (ex.chosen, ex.rejected) if isinstance(ex, PreferenceExample) else (ex,):
                self.stats.tokens += len(e.input_ids)
                self.stats.trained_tokens += e.trained
        self.stats.examples = len(out)
        if not out:
            raise InputDataError("the training data is empty (after skipping bad lines): nothing to train on")
        return out


def _str(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise InputDataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value
