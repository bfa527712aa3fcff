"""Decode speed: llmctl's engine vs transformers `generate` (and llama.cpp when installed), same model.

Greedy, fp32, CPU, the same prompt and the same number of new tokens (EOS ignored) for every tool.
Reports batch-1 tokens/s, batch-16 total tokens/s (batch 4 with --quick), and the ratios; then llmctl's
exact-greedy accelerators at batch 1 against its own plain greedy: speculative decoding with a draft made
by keeping the model's first --draft-layers decoder layers (a layer-dropped copy of the same model, so the
same tokenizer) or --draft DIR, also with the draft's head restricted to --draft-vocab token ids, prompt
lookup and lookahead, each with its acceptance rate.
Model load time is not counted.

    python benchmarks/generate.py            # SmolLM2-135M-Instruct (make smollm2), 128 new tokens
    python benchmarks/generate.py --quick    # llama-tiny, 16 new tokens, seconds
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import bench_model

import llmctl.core  # noqa: F401 - offline, quiet

PROMPT = "Write a short story about a robot who learns to paint. Once upon a time,"
# The "copy" workload: an instruction whose answer repeats text from the prompt (extraction, editing,
# quoting), where drafts are accepted often. The passage is written for this benchmark.
PASSAGE = (
    "The lighthouse keeper climbed the spiral stairs every evening at six. He cleaned the great lens with "
    "a soft cloth, trimmed the wick, and wrote the weather in a leather book: wind from the north-west, "
    "light rain, two fishing boats returning before dark. In forty years he had missed only one evening, "
    "the night his daughter was born, and even then he had asked his neighbour to light the lamp."
)
COPY_PROMPT = f"Repeat the following text exactly, word for word.\n\n{PASSAGE}"


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model")
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--draft-layers", type=int, default=0, help="layers kept in the draft (0: a quarter)")
    parser.add_argument("--draft", help="a draft model directory (e.g. from llmctl prune) instead")
    parser.add_argument("--num-draft-tokens", type=int, default=4, help="speculative: tokens per draft round")
    parser.add_argument(
        "--draft-vocab",
        type=int,
        default=8192,
        help="speculative is also run with the draft scoring this many lowest ids + the prompt's (0: not)",
    )
    parser.add_argument(
        "--draft-confidence",
        type=float,
        default=0.0,
        help="speculative is also run with --draft-vocab and this --draft-confidence (0: not)",
    )
    parser.add_argument(
        "--workload",
        choices=("story", "copy"),
        default="story",
        help="story: an open-ended prompt; copy: the answer repeats a passage of the prompt (chat template)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmctl.core.generate.engine import Request, generate
    from llmctl.core.generate.run import load_engine
    from llmctl.core.generate.sampling import SamplingParams

    tmp = tempfile.TemporaryDirectory(prefix="llmctl-bench-")
    model_dir = Path(bench_model(args.model, args.quick, Path(tmp.name)))
    new = args.new_tokens or (8 if args.quick else 128)
    repeats = 1 if args.quick else args.repeats

    engine = load_engine(str(model_dir), device="cpu", dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if args.workload == "copy" and tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": COPY_PROMPT}], add_generation_prompt=True, tokenize=True
        )
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    else:
        ids = tokenizer(COPY_PROMPT if args.workload == "copy" else PROMPT)["input_ids"]
    params = SamplingParams(max_tokens=new, ignore_eos=True)

    def ours(batch: int):
        return lambda: generate(engine, [Request(ids, params) for _ in range(batch)])

    def theirs(batch: int):
        x = torch.tensor([ids] * batch)
        kwargs = dict(
            max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        return lambda: hf.generate(x, attention_mask=torch.ones_like(x), **kwargs)

    # transformers' min_new_tokens masks EOS; ignore_eos does not, so mask it here for the comparison
    masked = {e: -1e9 for e in engine.eos_token_ids}
    no_eos = SamplingParams(max_tokens=new, ignore_eos=True, logit_bias=masked)
    same = generate(engine, [Request(ids, no_eos)])[0].token_ids == theirs(1)()[0, len(ids) :].tolist()
    rows = []
    big = 4 if args.quick else 16
    for batch in (1, big):
        t_ours, t_hf = median_time(ours(batch), repeats), median_time(theirs(batch), repeats)
        rows.append((batch, batch * new / t_ours, batch * new / t_hf))
    llama = _llama_cpp(model_dir, ids, new, repeats, Path(tmp.name))
    print(f"model: {model_dir}; {args.workload} prompt, {len(ids)} tokens; {new} new tokens")
    print(f"median of {repeats} run(s)")
    print(f"torch threads {torch.get_num_threads()}; greedy tokens identical to transformers: {same}")
    print(f"{'batch':>6}{'llmctl tok/s':>16}{'transformers tok/s':>22}{'ratio':>8}")
    for batch, a, b in rows:
        print(f"{batch:>6}{a:>16.1f}{b:>22.1f}{a / b:>7.2f}x")
    if llama is not None:
        print(f"llama.cpp (llama-cpp-python, same weights as GGUF f32), batch 1: {llama:.1f} tok/s")
    b1 = rows[0][1]
    _accelerators(engine, model_dir, ids, params, new, repeats, b1, args, Path(tmp.name))
    scaling = rows[1][1] / b1
    print(
        f"batch-{big} throughput / batch-1: {scaling:.2f}x; batch-1 vs transformers: {b1 / rows[0][2]:.2f}x"
    )


def _accelerators(engine, model_dir, ids, params, new, repeats, plain_tps, args, tmp) -> None:
    from llmctl.core.generate.engine import Request
    from llmctl.core.generate.lookup import LookupStats, generate_lookahead, generate_lookup
    from llmctl.core.generate.run import load_engine
    from llmctl.core.generate.speculative import DraftVocab, generate_speculative

    if args.draft:
        draft = load_engine(args.draft, device="cpu", dtype="float32")
        label = f"{Path(args.draft).name} ({draft.model.args.n_layers} layers)"
    else:
        keep = args.draft_layers or max(1, engine.model.args.n_layers // 4)
        draft = load_engine(str(_layer_dropped(model_dir, keep, tmp)), device="cpu", dtype="float32")
        label = f"first {keep} layers"
    k = args.num_draft_tokens
    vocab = DraftVocab(draft, args.draft_vocab) if args.draft_vocab else None
    ways = {
        f"speculative, draft = {label}, k={k}": lambda s: generate_speculative(
            engine, draft, Request(ids, params), num_draft=k, stats=s
        )
    }
    if vocab is not None:
        ways[f"  same, --draft-vocab {args.draft_vocab}"] = lambda s: generate_speculative(
            engine, draft, Request(ids, params), num_draft=k, stats=s, draft_vocab=vocab
        )
    if vocab is not None and args.draft_confidence:
        ways[f"  same, --draft-vocab and --draft-confidence {args.draft_confidence}"] = (
            lambda s: generate_speculative(
                engine, draft, Request(ids, params), num_draft=k, stats=s, draft_vocab=vocab,
                min_confidence=args.draft_confidence,
            )
        )  # fmt: skip
    ways["prompt lookup, k=8"] = lambda s: generate_lookup(engine, Request(ids, params), num_draft=8, stats=s)
    ways["lookahead, window 5"] = lambda s: generate_lookahead(
        engine, Request(ids, params), window=5, stats=s
    )
    print(f"{'batch-1 exact greedy':<56}{'tok/s':>8}{'vs plain':>10}{'accepted':>10}")
    for name, run in ways.items():
        stats = LookupStats()
        seconds = median_time(lambda run=run, stats=stats: run(stats), repeats)
        print(f"{name:<56}{new / seconds:>8.1f}{new / seconds / plain_tps:>9.2f}x{stats.acceptance:>10.0%}")


def _layer_dropped(model_dir: Path, keep: int, tmp: Path) -> Path:
    """A copy of the model with only its first ``keep`` decoder layers (same embeddings, norm, head)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp / f"draft-{keep}"
    out.mkdir(exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    config = json.loads((model_dir / "config.json").read_text())
    config["num_hidden_layers"] = keep
    (out / "config.json").write_text(json.dumps(config))
    state = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    kept = {
        k: v.contiguous()
        for k, v in state.items()
        if not k.startswith("model.layers.") or int(k.split(".")[2]) < keep
    }
    save_file(kept, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _llama_cpp(model_dir: Path, ids: list[int], new: int, repeats: int, tmp: Path) -> float | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from llmctl.core.models.gguf_export import export_gguf

    gguf = tmp / "model-f32.gguf"
    export_gguf(model_dir, gguf, outtype="f32")
    llm = Llama(model_path=str(gguf), n_ctx=len(ids) + new + 8, verbose=False)

    def run():
        llm.reset()
        out = []
        for token in llm.generate(ids, top_k=1, temp=0.0):
            out.append(token)
            if len(out) == new:
                break

    return new / median_time(run, repeats)


if __name__ == "__main__":
    main()
