"""Decode speed: llmctl's engine vs transformers `generate` (and llama.cpp when installed), same model.

Greedy, fp32, CPU, the same prompt and the same number of new tokens (EOS ignored) for every tool.
Reports batch-1 tokens/s, batch-16 total tokens/s (batch 4 with --quick), and the ratios.
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
    ids = tokenizer(PROMPT)["input_ids"]
    params = SamplingParams(max_tokens=new, ignore_eos=True)

    def ours(batch: int):
        return lambda: generate(engine, [Request(ids, params) for _ in range(batch)])

    def theirs(batch: int):
        x = torch.tensor([ids] * batch)
        kwargs = dict(
            max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        return lambda: hf.generate(x, attention_mask=torch.ones_like(x), **kwargs)

    same = generate(engine, [Request(ids, params)])[0].token_ids == theirs(1)()[0, len(ids) :].tolist()
    rows = []
    big = 4 if args.quick else 16
    for batch in (1, big):
        t_ours, t_hf = median_time(ours(batch), repeats), median_time(theirs(batch), repeats)
        rows.append((batch, batch * new / t_ours, batch * new / t_hf))
    llama = _llama_cpp(model_dir, ids, new, repeats, Path(tmp.name))
    print(f"model: {model_dir}; prompt {len(ids)} tokens; {new} new tokens; median of {repeats}")
    print(f"torch threads {torch.get_num_threads()}; greedy tokens identical to transformers: {same}")
    print(f"{'batch':>6}{'llmctl tok/s':>16}{'transformers tok/s':>22}{'ratio':>8}")
    for batch, a, b in rows:
        print(f"{batch:>6}{a:>16.1f}{b:>22.1f}{a / b:>7.2f}x")
    if llama is not None:
        print(f"llama.cpp (llama-cpp-python, same weights as GGUF f32), batch 1: {llama:.1f} tok/s")
    b1 = rows[0][1]
    scaling = rows[1][1] / b1
    print(
        f"batch-{big} throughput / batch-1: {scaling:.2f}x; batch-1 vs transformers: {b1 / rows[0][2]:.2f}x"
    )


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
