"""Constrained decoding back ends, measured: xgrammar (what llmctl uses) vs outlines-core.

For each JSON schema, both libraries build their structure for the model's whole vocabulary (compile
time), then walk a valid JSON instance token by token, computing the allowed-token mask before each
token and applying it to a logits row (per-token time: what constrained decoding adds to every step).
Both must allow every token of the instance. Medians over repeats; outlines-core is skipped if absent.

    python benchmarks/constrained.py            # SmolLM2-135M-Instruct's 49,152-token vocabulary
    python benchmarks/constrained.py --quick    # llama-tiny's byte-level vocabulary, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import bench_model  # noqa: E402

CASES = [
    (
        {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "ok": {"type": "boolean"}},
            "required": ["name", "age", "ok"],
        },
        {"name": "Ada Lovelace", "age": 36, "ok": True},
    ),
    (
        {
            "type": "object",
            "properties": {
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
                        "required": ["sku", "qty"],
                    },
                },
                "total": {"type": "number"},
            },
            "required": ["items", "total"],
        },
        {"items": [{"sku": "A-1", "qty": 2}, {"sku": "B-22", "qty": 10}], "total": 41.5},
    ),
]


def run_xgrammar(tokenizer, vocab_size, eos, schema, ids, repeats):
    import torch
    import xgrammar as xgr

    start = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=[eos])
    compiled = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False).compile_json_schema(
        json.dumps(schema), any_whitespace=False
    )
    compile_s = time.perf_counter() - start
    per_token = []
    for _ in range(repeats):
        matcher = xgr.GrammarMatcher(compiled)
        bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        logits = torch.zeros(1, vocab_size)
        t0 = time.perf_counter()
        for token in ids:
            matcher.fill_next_token_bitmask(bitmask, 0)
            xgr.apply_token_bitmask_inplace(logits, bitmask)
            assert logits[0, token] == 0, "xgrammar rejected a valid token"
            matcher.accept_token(token)
            logits.zero_()
        per_token.append((time.perf_counter() - t0) / len(ids))
    return compile_s, statistics.median(per_token)


def run_outlines(tokenizer, vocab_size, eos, schema, ids, repeats):
    import torch
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    from llmctl.core.models.tokenizers import bytes_to_unicode

    start = time.perf_counter()
    decode = {c: b for b, c in bytes_to_unicode().items()}
    mapping: dict[bytes, list[int]] = {}
    for token, i in tokenizer.get_vocab().items():
        if i == eos or i >= vocab_size:
            continue
        try:
            mapping.setdefault(bytes(decode[c] for c in token), []).append(i)
        except KeyError:  # special tokens: not text
            continue
    regex = build_regex_from_schema(json.dumps(schema), r"[ ]?")
    index = Index(regex, Vocabulary(eos, mapping))
    compile_s = time.perf_counter() - start
    per_token = []
    for _ in range(repeats):
        guide = Guide(index)
        logits = torch.zeros(vocab_size)
        t0 = time.perf_counter()
        for token in ids:
            allowed = torch.tensor(guide.get_tokens())
            mask = torch.full((vocab_size,), float("-inf"))
            mask[allowed] = 0
            logits += mask
            assert logits[token] == 0, "outlines-core rejected a valid token"
            guide.advance(token)
            logits.zero_()
        per_token.append((time.perf_counter() - t0) / len(ids))
    return compile_s, statistics.median(per_token)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from transformers import AutoConfig, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        model = bench_model(args.model, args.quick, Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(model)
        vocab_size = AutoConfig.from_pretrained(model).vocab_size
    eos = tokenizer.eos_token_id
    try:
        import outlines_core  # noqa: F401

        have_outlines = True
    except ImportError:
        have_outlines = False
    repeats = 2 if args.quick else args.repeats
    peer = "present" if have_outlines else "absent"
    print(f"# vocabulary {vocab_size}; repeats {repeats}; outlines-core {peer}")
    print(f"{'schema':<8} {'tokens':>6} {'xgr compile s':>14} {'xgr us/token':>13}", end=" ")
    print(f"{'oc compile s':>13} {'oc us/token':>12}")
    ratios = []
    for n, (schema, instance) in enumerate(CASES):
        ids = tokenizer(json.dumps(instance), add_special_tokens=False)["input_ids"]
        xc, xt = run_xgrammar(tokenizer, vocab_size, eos, schema, ids, repeats)
        oc = ot = float("nan")
        if have_outlines:
            oc, ot = run_outlines(tokenizer, vocab_size, eos, schema, ids, repeats)
            ratios.append(ot / xt)
        print(f"{n:<8} {len(ids):>6} {xc:>14.3f} {xt * 1e6:>13.0f} {oc:>13.3f} {ot * 1e6:>12.0f}")
    ratio = statistics.median(ratios) if ratios else float("nan")
    print(f"per-token mask time, outlines-core / xgrammar (median over schemas): {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
