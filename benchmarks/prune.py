"""Perplexity after pruning: dense vs magnitude vs Wanda vs SparseGPT (50% and 2:4), layer dropping (with and
without recovery fine-tuning) and low-rank factorization.

All methods prune the same model in the same run with llmctl's library (``llmctl.core.prune``),
calibrated on the same text (the first half of WikiText-2 test, 32 sequences of 512 tokens, as in the
Wanda paper's setting) and evaluated on held-out text (the second half), with ``llmctl eval``'s rolling
windows (every token scored once). Layer dropping reports perplexity and greedy-generation tokens/s;
progressive dropping on GSM8K train text is compared with one-shot ShortGPT at the same depth on GSM8K
test text (in-domain), without and with ``--recover-steps`` (LoRA between removals, TrimLLM-style). Low-rank
rows factor every decoder linear at a rank ratio (plain and activation-weighted SVD) and report perplexity,
size and greedy tokens/s of the factored model. No peer tool runs here: the Wanda/SparseGPT reference
repositories are research scripts for CUDA, and llm-compressor pins an older transformers.

    python benchmarks/prune.py            # SmolLM2-135M-Instruct, WikiText-2 + GSM8K from ../shared/data
    python benchmarks/prune.py --quick    # tiny random model and synthetic text, seconds
    python benchmarks/prune.py --only lowrank   # one group: unstructured, layers, lowrank or recovery
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from _common import bench_model

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
WIKITEXT = DATA / "wikitext-2" / "test.txt"
GSM8K_TRAIN = DATA / "gsm8k" / "train.jsonl"
GSM8K_TEST = DATA / "gsm8k" / "test.jsonl"


def texts(quick: bool, tmp: Path, eval_chars: int):
    """(calibration file, held-out text, domain file, in-domain held-out text, in-domain prompts)."""
    if quick or not WIKITEXT.is_file():
        words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
        lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) for i in range(200)]
        calib, held = lines[:100], " ".join(lines[100:])[:eval_chars]
        domain = [f"Q: what is {i} plus {i}? A: {2 * i}." for i in range(200)]
        domain_held = " ".join(f"Q: what is {i} times 2? A: {2 * i}." for i in range(50))[:eval_chars]
        prompts = [f"Q: what is {i} plus {i}? A:" for i in (300, 301)]
    else:
        lines = [line for line in WIKITEXT.read_text(encoding="utf-8").splitlines() if line.strip()]
        half = len(lines) // 2
        calib, held = lines[:half], "\n".join(lines[half:])[:eval_chars]

        def qa(path):
            return [
                (r["question"] + "\n" + r["answer"]) for r in map(json.loads, path.open(encoding="utf-8"))
            ]

        domain = qa(GSM8K_TRAIN)[:2000]
        domain_held = "\n\n".join(qa(GSM8K_TEST)[:200])[:eval_chars]
        questions = [json.loads(line)["question"] for line in GSM8K_TEST.open(encoding="utf-8")]
        prompts = [q + " " for q in questions[200:203]]  # not scored above; as the domain file lays them out
    calib_path, domain_path = tmp / "calib.txt", tmp / "domain.txt"
    calib_path.write_text("\n".join(calib) + "\n", encoding="utf-8")
    domain_path.write_text("\n".join(d.replace("\n", " ") for d in domain) + "\n", encoding="utf-8")
    return calib_path, held, domain_path, domain_held, prompts


def tokens_per_second(model, tokenizer, new_tokens: int) -> float:
    import torch

    ids = tokenizer("The history of science is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start)


def speculative_rows(model_dir: Path, drafts: dict[int, Path], prompts: list[str], new_tokens: int, n_layers):
    """Each shallow model as the draft of the dense one in llmctl's speculative decoding (``llmctl generate
    --draft``): exact greedy, batch 1, on in-domain prompts; tokens/s against plain greedy, and how many
    drafted tokens the dense model accepted."""
    from llmctl.core.generate.engine import Request, generate
    from llmctl.core.generate.run import load_engine
    from llmctl.core.generate.sampling import SamplingParams
    from llmctl.core.generate.speculative import SpeculativeStats, generate_speculative

    engine = load_engine(str(model_dir), device="cpu", dtype="float32")
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    requests = [Request(engine.tokenizer(p)["input_ids"], params) for p in prompts]
    generate(engine, [Request(requests[0].prompt_ids, SamplingParams(max_tokens=2, ignore_eos=True))])

    def timed(fn) -> float:
        start = time.perf_counter()
        for r in requests:
            fn(r)
        return len(requests) * new_tokens / (time.perf_counter() - start)

    plain = timed(lambda r: generate(engine, [r]))
    rows = []
    for k, path in drafts.items():
        draft = load_engine(str(path), device="cpu", dtype="float32")
        for num_draft in (2, 4):
            stats = SpeculativeStats()
            tps = timed(
                lambda r, d=draft, n=num_draft, s=stats: generate_speculative(
                    engine, d, r, num_draft=n, stats=s
                )
            )
            rows.append((f"draft -{k}/{n_layers} (progressive + recovery), k={num_draft}", tps, tps / plain,
                         stats.acceptance))  # fmt: skip
            print(f"  speculative {rows[-1][0]}: {tps:.1f} tok/s ({tps / plain:.2f}x), "
                  f"accepted {stats.acceptance:.0%}", file=sys.stderr, flush=True)  # fmt: skip
    return plain, rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, synthetic text")
    parser.add_argument("--model", help="model directory (default: SmolLM2, or llama-tiny with --quick)")
    parser.add_argument(
        "--eval-chars", type=int, help="held-out characters scored (default 40000; quick 3000)"
    )
    parser.add_argument("--no-progressive", action="store_true", help="skip progressive layer dropping")
    parser.add_argument(
        "--only",
        choices=["unstructured", "layers", "lowrank", "recovery"],
        help="run one group of rows (groups can run in parallel)",
    )
    parser.add_argument(
        "--rank-ratio",
        type=float,
        action="append",
        help="lowrank rank ratios (default 0.6 and 0.4; quick 0.25)",
    )
    parser.add_argument("--recover-steps", type=int, help="recovery steps per removal (default 16; quick 3)")
    parser.add_argument(
        "--drop", type=int, help="layers dropped by the progressive/recovery rows (default 25%%)"
    )
    parser.add_argument(
        "--draft-quarter-only", action="store_true", help="recovery group: skip the 50%% depth draft"
    )
    args = parser.parse_args()

    import torch

    from llmctl.core.models.hf import load_model, load_tokenizer, resolve_model, save_model
    from llmctl.core.prune.run import (
        DEFAULT_CALIB,
        PruneOptions,
        count_parameters,
        perplexity,
        prune_loaded,
    )
    from llmctl.core.quantize.calib import CalibrationSpec, decoder_layers

    quick = args.quick
    eval_chars = args.eval_chars or (3000 if quick else 40_000)
    with tempfile.TemporaryDirectory(prefix="llmctl-bench-") as tmp:
        tmp = Path(tmp)
        model_dir = bench_model(args.model, quick, tmp)
        calib_path, held, domain_path, domain_held, domain_prompts = texts(quick, tmp, eval_chars)
        spec = (
            replace(DEFAULT_CALIB, path=calib_path)
            if not quick
            else CalibrationSpec(calib_path, samples=4, seq_len=64)
        )
        ref = resolve_model(model_dir)
        tokenizer = load_tokenizer(ref)
        max_length = 64 if quick else 512
        new_tokens = 8 if quick else 48
        n_layers = len(decoder_layers(load_model(ref, device="cpu", dtype="float32")))

        rows = []
        speculative = None
        groups = {args.only} if args.only else {"unstructured", "layers", "lowrank", "recovery"}

        def run(
            label: str,
            opts: PruneOptions | None,
            speed: bool = False,
            domain: bool = False,
            save: Path | None = None,
        ) -> dict:
            model = load_model(ref, device="cpu", dtype="float32")
            t0 = time.perf_counter()
            report = prune_loaded(model, tokenizer, opts) if opts else {}
            seconds = time.perf_counter() - t0 if opts else 0.0
            row = {
                "label": label,
                "seconds": seconds,
                "sparsity": report.get("sparsity"),
                "layers": len(decoder_layers(model)),
                "params": count_parameters(model),
                "size_mb": sum(
                    p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()
                )
                / 2**20,
                "ppl": perplexity(model, tokenizer, [held], batch_size=4, max_length=max_length),
            }
            if domain:
                row["domain_ppl"] = perplexity(
                    model, tokenizer, [domain_held], batch_size=4, max_length=max_length
                )
            if speed:
                row["tok_s"] = tokens_per_second(model, tokenizer, new_tokens)
            if save is not None:  # for the speculative-decoding rows
                save_model(model, tokenizer, save)
            rows.append(row)
            dom = f", in-domain ppl {row['domain_ppl']:.2f}" if domain else ""
            print(f"  {label}: ppl {row['ppl']:.2f}{dom} ({seconds:.1f}s)", file=sys.stderr, flush=True)
            return row

        dense = run("dense", None, speed=True, domain=True)
        for target in ("0.5", "2:4") if "unstructured" in groups else ():
            for method in ("magnitude", "wanda", "sparsegpt"):
                opts = PruneOptions(method=method, calib=spec)
                if target == "0.5":
                    opts.sparsity = 0.5
                else:
                    opts.pattern = target
                run(f"{method} {'50%' if target == '0.5' else target}", opts)
        quarter = args.drop or max(1, round(n_layers * 0.25))
        half = max(1, round(n_layers * 0.5))
        for k in sorted({quarter, half}) if "layers" in groups else ():
            for score in ("block-influence", "angular"):
                opts = PruneOptions(method="layers", score=score, drop=k, calib=spec)
                run(f"layers {score} -{k}/{n_layers}", opts, speed=True, domain=k == quarter)
        dspec = replace(spec, samples=2 if quick else 4, seq_len=64 if quick else 256)
        if not args.no_progressive and groups & {"layers", "recovery"}:
            run(f"progressive (GSM8K) -{quarter}/{n_layers}",
                PruneOptions(method="progressive-layers", domain=domain_path, drop=quarter, calib=dspec),
                speed=True, domain=True)  # fmt: skip
        if "recovery" in groups:
            if "layers" not in groups:
                opts = PruneOptions(method="layers", score="block-influence", drop=quarter, calib=spec)
                run(f"layers block-influence -{quarter}/{n_layers}", opts, speed=True, domain=True)
            steps = args.recover_steps or (3 if quick else 16)
            drafts = {}
            for k in sorted({quarter, half}) if not args.draft_quarter_only else (quarter,):
                drafts[k] = tmp / f"draft-{k}"
                run(f"progressive + {steps} LoRA steps -{k}/{n_layers}",
                    PruneOptions(method="progressive-layers", domain=domain_path, drop=k, calib=dspec,
                                 recover_steps=steps, recover_lr=2e-4 if not quick else 5e-3),
                    speed=True, domain=True, save=drafts[k])  # fmt: skip
            speculative = speculative_rows(model_dir, drafts, domain_prompts, new_tokens, n_layers)
        ratios = args.rank_ratio or ([0.25] if quick else [0.6, 0.4])
        for ratio in ratios if "lowrank" in groups else ():
            for weighted in (False, True):
                opts = PruneOptions(
                    method="lowrank", rank_ratio=ratio, activation_weighted=weighted, calib=spec
                )
                run(f"lowrank {ratio:g}{' act-weighted' if weighted else ''}", opts, speed=True)

    print(
        f"model: {model_dir}; calibration: {spec.samples} x {spec.seq_len} tokens; held-out:"
        f" {eval_chars} chars, windows of {max_length}; torch {torch.__version__},"
        f" threads {torch.get_num_threads()}"
    )
    print(f"{'method':<40}{'sparsity':>9}{'layers':>7}{'params':>13}{'MB':>8}{'ppl':>11}{'vs dense':>9}"
          f"{'GSM8K ppl':>11}{'tok/s':>8}{'prune s':>9}")  # fmt: skip
    for r in rows:
        sp = "-" if r["sparsity"] is None else f"{r['sparsity']:.3f}"
        dom = f"{r['domain_ppl']:.2f}" if "domain_ppl" in r else "-"
        tps = f"{r['tok_s']:.1f}" if "tok_s" in r else "-"
        print(f"{r['label']:<40}{sp:>9}{r['layers']:>7}{r['params']:>13,}{r['size_mb']:>8.1f}{r['ppl']:>11.2f}"
              f"{r['ppl'] / dense['ppl']:>8.2f}x{dom:>11}{tps:>8}{r['seconds']:>9.1f}")  # fmt: skip
    if speculative:
        plain, spec_rows = speculative
        print(f"speculative decoding (llmctl generate --draft), dense target, exact greedy, batch 1, "
              f"{len(domain_prompts)} GSM8K prompts x {new_tokens} tokens: "
              f"plain greedy {plain:.1f} tok/s")  # fmt: skip
        print(f"{'draft':<48}{'tok/s':>8}{'vs plain':>10}{'accepted':>10}")
        for label, tps, ratio, accepted in spec_rows:
            print(f"{label:<48}{tps:>8.1f}{ratio:>9.2f}x{accepted:>10.0%}")
    by = {r["label"]: r for r in rows}
    if args.only == "lowrank":
        best = min((r for r in rows if r["label"].startswith("lowrank")), key=lambda r: r["ppl"])
        print(f"{best['label']}: ppl vs dense {best['ppl'] / dense['ppl']:.2f}x; parameters "
              f"{best['params'] / dense['params']:.2f}x; "
              f"tokens/s vs dense {best['tok_s'] / dense['tok_s']:.2f}x")  # fmt: skip
        return
    if args.only == "recovery":
        shallow = by[f"layers block-influence -{quarter}/{n_layers}"]
        rec = next(r for r in rows if "LoRA steps" in r["label"])
        prog = by.get(f"progressive (GSM8K) -{quarter}/{n_layers}", rec)
        print(f"GSM8K ppl at -{quarter} layers: progressive+recovery / progressive "
              f"{rec['domain_ppl'] / prog['domain_ppl']:.3f}x; progressive+recovery / one-shot ShortGPT "
              f"{rec['domain_ppl'] / shallow['domain_ppl']:.3f}x")  # fmt: skip
        return
    if args.only == "layers":
        shallow = by[f"layers block-influence -{quarter}/{n_layers}"]
        prog = by.get(f"progressive (GSM8K) -{quarter}/{n_layers}", shallow)
        print(f"GSM8K ppl at -{quarter} layers: progressive / one-shot ShortGPT "
              f"{prog['domain_ppl'] / shallow['domain_ppl']:.3f}x; tokens/s vs dense "
              f"{shallow['tok_s'] / dense['tok_s']:.2f}x")  # fmt: skip
        return
    sg, mag, wa = by["sparsegpt 50%"]["ppl"], by["magnitude 50%"]["ppl"], by["wanda 50%"]["ppl"]
    print(
        f"at 50% sparsity: SparseGPT ppl / magnitude ppl {sg / mag:.3f}x; Wanda / magnitude {wa / mag:.3f}x"
    )


if __name__ == "__main__":
    main()
