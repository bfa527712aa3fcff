"""Constrained decoding: outputs guaranteed to be in a language (JSON schema, any JSON, regex, grammar).

The grammar machinery is xgrammar's (chosen by measurement over outlines-core: see
``benchmarks/constrained.py`` and docs/benchmarks.md — comparable per-token mask cost, and xgrammar also
compiles context-free grammars (GBNF/EBNF and Lark) and any-JSON, which a regex-only index cannot
express, and reads a Hugging Face tokenizer's byte-level vocabulary directly).

At every step a row's matcher fills a bitmask of the tokens that keep the output a prefix of the
language; every other logit is set to -inf after the penalties and before temperature/top-k/top-p/min-p
(vLLM's order), so greedy and sampled decoding pick only allowed tokens. When the grammar is complete,
only the stop token (EOS) is allowed and the row ends with ``finish_reason = "stop"``; a row that runs
out of ``max_tokens`` first ends with ``"length"`` and its text may be cut short, as in OpenAI's API.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmctl.core.errors import InputDataError, UsageError

KINDS = ("json_schema", "json", "regex", "grammar", "lark")


@dataclass(frozen=True)
class Constraint:
    kind: str  # one of KINDS
    spec: str = ""  # the schema (JSON text), regex or grammar text (GBNF or Lark); "" for any JSON

    @classmethod
    def from_flags(
        cls, json_schema: Path | None, any_json: bool, regex: str | None, grammar: Path | None
    ) -> Constraint | None:
        given = [x for x in (json_schema, any_json or None, regex, grammar) if x is not None]
        if len(given) > 1:
            raise UsageError("choose one of --json-schema, --json, --regex and --grammar")
        if json_schema is not None:
            text = _read(json_schema, "--json-schema")
            try:
                json.loads(text)
            except json.JSONDecodeError as e:
                raise UsageError(f"--json-schema {json_schema}: not JSON: {e}") from None
            return cls("json_schema", text)
        if any_json:
            return cls("json")
        if regex is not None:
            return cls("regex", regex)
        if grammar is not None:
            # A .lark file is a Lark grammar; anything else GBNF/EBNF (llama.cpp's and xgrammar's dialect).
            return cls("lark" if Path(grammar).suffix == ".lark" else "grammar", _read(grammar, "--grammar"))
        return None

    @classmethod
    def from_response_format(cls, response_format: Any) -> Constraint | None:
        """OpenAI's ``response_format``: ``{"type": "json_object"}`` or ``{"type": "json_schema", ...}``."""
        if response_format is None:
            return None
        if not isinstance(response_format, dict) or "type" not in response_format:
            raise ValueError("response_format must be an object with a 'type'")
        kind = response_format["type"]
        if kind == "text":
            return None
        if kind == "json_object":
            return cls("json")
        if kind == "json_schema":
            block = response_format.get("json_schema")
            schema = block.get("schema") if isinstance(block, dict) else None
            if not isinstance(schema, dict):
                raise ValueError("response_format.json_schema.schema must be a JSON schema object")
            return cls("json_schema", json.dumps(schema))
        raise ValueError(f"unknown response_format type {kind!r}")


def _read(path: Path, flag: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"{flag} {path}: {e.strerror or e}") from None


class Compiler:
    """Compiles constraints for one model's tokenizer (cached), and makes per-row matchers."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        try:
            import xgrammar as xgr
        except ImportError as e:  # pragma: no cover - xgrammar is a dependency
            raise UsageError(f"constrained decoding needs the xgrammar package: {e}") from None
        self._xgr = xgr
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids) or None
        )
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2)
        self._cache: dict[Constraint, Any] = {}
        # xgrammar's JSON strings admit raw control characters, which JSON (RFC 8259) forbids and strict
        # parsers reject: tokens holding a byte below 0x20 are never allowed in JSON output (compact
        # whitespace is all JSON needs here).
        control = torch.zeros(vocab_size, dtype=torch.bool)
        for i, raw in enumerate(self.info.decoded_vocab[:vocab_size]):
            if any(b < 0x20 for b in raw):
                control[i] = True
        self.control_tokens = control

    def compile(self, c: Constraint, where: str = "") -> Any:
        if c in self._cache:
            return self._cache[c]
        prefix = f"{where}: " if where else ""
        try:
            if c.kind == "json_schema":
                compiled = self.compiler.compile_json_schema(c.spec, any_whitespace=False)
            elif c.kind == "json":
                compiled = self.compiler.compile_builtin_json_grammar()
            elif c.kind == "regex":
                compiled = self.compiler.compile_regex(c.spec)
            elif c.kind == "grammar":
                compiled = self.compiler.compile_grammar(c.spec)
            elif c.kind == "lark":
                compiled = self.compiler.compile_grammar(self._xgr.Grammar.from_lark(c.spec))
            else:
                raise UsageError(f"unknown constraint kind {c.kind!r}")
        except UsageError:
            raise
        except Exception as e:  # xgrammar raises RuntimeError/ValueError with the parser's message
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputDataError(f"{prefix}invalid {c.kind.replace('_', ' ')}: {message}") from None
        self._cache[c] = compiled
        return compiled

    def matcher(self, c: Constraint, where: str = "") -> RowMatcher:
        forbid = self.control_tokens if c.kind in ("json_schema", "json") else None
        return RowMatcher(self, self._xgr.GrammarMatcher(self.compile(c, where)), forbid)


class RowMatcher:
    """One row's grammar state: masks logits, follows the chosen tokens."""

    def __init__(self, compiler: Compiler, matcher: Any, forbid: torch.Tensor | None = None) -> None:
        self._xgr = compiler._xgr
        self.matcher = matcher
        self.bitmask = self._xgr.allocate_token_bitmask(1, compiler.vocab_size)
        self.forbid = forbid

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Set the logits of disallowed tokens to -inf (in place; a 1-D row on the CPU or a GPU)."""
        self.matcher.fill_next_token_bitmask(self.bitmask, 0)
        row = logits.view(1, -1)
        if row.device.type == "cpu":
            self._xgr.apply_token_bitmask_inplace(row, self.bitmask)
        else:
            self._xgr.apply_token_bitmask_inplace(row, self.bitmask.to(row.device))
        if self.forbid is not None:
            n = min(self.forbid.numel(), logits.shape[-1])
            logits[:n].masked_fill_(self.forbid[:n].to(logits.device), float("-inf"))
        return logits

    def accept(self, token: int) -> None:
        if not self.matcher.accept_token(token):  # cannot happen for a token the mask allowed
            raise RuntimeError(f"token {token} is outside the grammar")

    @property
    def finished(self) -> bool:
        return self.matcher.is_terminated()


def compiler_for(engine: Any) -> Compiler:
    """The engine's compiler, built on first use (xgrammar reads the whole vocabulary once)."""
    compiler = getattr(engine, "_constraint_compiler", None)
    if compiler is None:
        compiler = Compiler(engine.tokenizer, engine.model.args.vocab_size, sorted(engine.eos_token_ids))
        engine._constraint_compiler = compiler
    return compiler
