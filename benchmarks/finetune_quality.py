"""Does `llmctl finetune` teach the model something? LoRA SFT on GSM8K and LoRA DPO on HH-RLHF, SmolLM2-135M.

SFT: LoRA on the first N GSM8K training problems, in the format `llmctl eval --task gsm8k` prompts with
("Question: ...\\nAnswer:", then the worked answer ending in "#### <number>"). Reported for the base and the
merged fine-tuned model:
- the held-out loss: mean token cross-entropy of the answers of GSM8K *test* problems;
- GSM8K exact match, measured by `llmctl eval` (strict "#### N" match and flexible extraction).

DPO: LoRA DPO (beta 0.1) on HH-RLHF harmless-base pairs. Each dialogue is split at its last
"\\n\\nAssistant:" into a prompt and the chosen/rejected reply. On held-out pairs we report:
- the implicit reward margin beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))), which is 0 for the
  base model by definition;
- the fraction of pairs where it is positive;
- the raw log-prob margin log pi(c) - log pi(r), before and after.

    python benchmarks/finetune_quality.py                 # SmolLM2: 400 SFT problems, 150 DPO pairs (~40 min)
    python benchmarks/finetune_quality.py --only dpo
    python benchmarks/finetune_quality.py --quick          # tiny model, synthetic data, seconds
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import bench_model

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
GSM8K_TRAIN, GSM8K_TEST = DATA / "gsm8k" / "train.jsonl", DATA / "gsm8k" / "test.jsonl"
HH = DATA / "hh-rlhf-harmless-base" / "test.jsonl.gz"
ASSISTANT = "\n\nAssistant:"


def llmctl(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "llmctl", *args, "--json", "--quiet"], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"llmctl {' '.join(args[:2])} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


# -- data --------------------------------------------------------------------------------------------------
def gsm8k_rows(path: Path, start: int, count: int) -> list[dict]:
    rows = [json.loads(line) for line in path.open(encoding="utf-8")][start : start + count]
    return [{"prompt": f"Question: {r['question']}\nAnswer:", "completion": " " + r["answer"]} for r in rows]


def hh_pairs(start: int, count: int, max_chars: int) -> list[dict]:
    pairs = []
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            cut_c, cut_r = r["chosen"].rfind(ASSISTANT), r["rejected"].rfind(ASSISTANT)
            if cut_c < 0 or r["chosen"][:cut_c] != r["rejected"][:cut_r]:
                continue
            prompt = r["chosen"][: cut_c + len(ASSISTANT)]
            chosen, rejected = r["chosen"][cut_c + len(ASSISTANT) :], r["rejected"][cut_r + len(ASSISTANT) :]
            if chosen == rejected or max(len(prompt + chosen), len(prompt + rejected)) > max_chars:
                continue
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs[start : start + count]


def synthetic(quick_kind: str, n: int) -> list[dict]:
    if quick_kind == "sft":
        return [
            {
                "prompt": f"Question: what is {i} plus {i}?\nAnswer:",
                "completion": f" {i}+{i}={2 * i}\n#### {2 * i}",
            }
            for i in range(n)
        ]
    return [{"prompt": f"Human: say {i}.{ASSISTANT}", "chosen": f" {i}", "rejected": " no"} for i in range(n)]


# -- scoring -----------------------------------------------------------------------------------------------
@torch.no_grad()
def completion_logps(model_dir: str, rows: list[dict], field: str) -> list[tuple[float, int]]:
    """(summed log-prob, tokens) of ``row[field]`` after ``row["prompt"]``, for each row."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for r in rows:
        p = tok(r["prompt"])["input_ids"]
        c = tok(r[field], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + c])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        picked = logp[len(p) - 1 :].gather(-1, ids[0, len(p) :, None]).squeeze(-1)
        out.append((float(picked.sum()), len(c)))
    return out


def heldout_loss(model_dir: str, rows: list[dict]) -> float:
    scores = completion_logps(model_dir, rows, "completion")
    return -sum(s for s, _ in scores) / sum(n for _, n in scores)


def gsm8k_em(model_dir: str, test: Path, fewshot: Path, limit: int, shots: int) -> dict:
    res = llmctl(
        "eval", model_dir, "--task", "gsm8k", "--data", str(test), "--fewshot-data", str(fewshot),
        "--num-fewshot", str(shots), "--limit", str(limit), "--batch-size", "16",
    )  # fmt: skip
    metrics = res.get("results", res)
    metrics = metrics.get("gsm8k", metrics) if isinstance(metrics, dict) else metrics
    return {k: v for k, v in metrics.items() if k.startswith("exact_match")}


# -- the two experiments -----------------------------------------------------------------------------------
def run_sft(model: str, tmp: Path, args) -> list[str]:
    if args.quick:
        train, heldout = synthetic("sft", 24), synthetic("sft", 32)[24:]
    else:
        train, heldout = gsm8k_rows(GSM8K_TRAIN, 0, args.sft_records), gsm8k_rows(GSM8K_TEST, 0, args.heldout)
    train_file = write_jsonl(tmp / "sft.jsonl", train)
    out = tmp / "sft-out"
    t0 = time.perf_counter()
    summary = llmctl(
        "finetune", model, str(train_file), "-o", str(out), "--method", "lora", "--r", "16", "--alpha", "32",
        "--lr", str(args.lr), "--epochs", str(args.epochs), "--batch-size", "8", "--max-length", "512",
        "--warmup-ratio", "0.03", "--merge", "--device", "cpu", "--seed", "0",
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    base_loss, tuned_loss = heldout_loss(model, heldout), heldout_loss(str(out), heldout)
    lines = [
        f"SFT: LoRA r=16 on {len(train)} problems, {summary['steps']} steps, {seconds:.0f} s "
        f"({summary['train_tokens_per_s']} tok/s)",
        f"  held-out answer loss ({len(heldout)} problems): base {base_loss:.4f} -> tuned {tuned_loss:.4f}",
    ]
    if not args.quick and args.em_limit:
        test = write_jsonl(tmp / "gsm8k-test.jsonl", [json.loads(x) for x in GSM8K_TEST.open()])
        shots = write_jsonl(
            tmp / "gsm8k-shots.jsonl", [json.loads(x) for x in GSM8K_TRAIN.open()][-50:]
        )  # few-shot examples from problems not trained on
        for name, directory in (("base", model), ("tuned", str(out))):
            em = gsm8k_em(directory, test, shots, args.em_limit, args.shots)
            lines.append(
                f"  GSM8K exact match, {args.shots}-shot, first {args.em_limit} test problems, {name}: {em}"
            )
    lines.append(f"SFT held-out loss ratio (tuned / base): {tuned_loss / base_loss:.3f}x")
    return lines


def run_dpo(model: str, tmp: Path, args) -> list[str]:
    if args.quick:
        pairs = synthetic("dpo", 32)
        train, heldout = pairs[:24], pairs[24:]
    else:
        pairs = hh_pairs(0, args.dpo_pairs + args.heldout_pairs, args.max_chars)
        train, heldout = pairs[: args.dpo_pairs], pairs[args.dpo_pairs :]
    train_file = write_jsonl(tmp / "dpo.jsonl", train)
    out = tmp / "dpo-out"
    t0 = time.perf_counter()
    summary = llmctl(
        "finetune", model, str(train_file), "-o", str(out), "--method", "lora", "--objective", "dpo",
        "--beta", str(args.beta), "--r", "16", "--alpha", "32", "--lr", str(args.dpo_lr), "--epochs", "1",
        "--batch-size", "4", "--max-length", "512", "--merge", "--device", "cpu", "--seed", "0",
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    ref_c, ref_r = completion_logps(model, heldout, "chosen"), completion_logps(model, heldout, "rejected")
    pol_c, pol_r = (
        completion_logps(str(out), heldout, "chosen"),
        completion_logps(str(out), heldout, "rejected"),
    )
    margins = [
        args.beta * ((pc[0] - rc[0]) - (pr[0] - rr[0]))
        for pc, rc, pr, rr in zip(pol_c, ref_c, pol_r, ref_r, strict=True)
    ]
    raw_before = sum(c[0] - r[0] for c, r in zip(ref_c, ref_r, strict=True)) / len(heldout)
    raw_after = sum(c[0] - r[0] for c, r in zip(pol_c, pol_r, strict=True)) / len(heldout)
    mean_margin = sum(margins) / len(margins)
    wins = sum(m > 0 for m in margins) / len(margins)
    return [
        f"DPO: LoRA r=16, beta {args.beta}, on {len(train)} pairs, {summary['steps']} steps, {seconds:.0f} s",
        f"  held-out pairs: {len(heldout)}; reward margin base 0 -> tuned {mean_margin:.4f}; "
        f"pairs with a positive margin {wins:.1%}",
        f"  log pi(chosen) - log pi(rejected), mean: base {raw_before:.3f} -> tuned {raw_after:.3f}",
        f"DPO held-out preference accuracy vs chance: {wins / 0.5:.2f}x",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, synthetic data")
    parser.add_argument("--model", help="model directory (default: SmolLM2, or llama-tiny with --quick)")
    parser.add_argument("--only", choices=["sft", "dpo"])
    parser.add_argument("--sft-records", type=int, default=400)
    parser.add_argument("--heldout", type=int, default=100, help="GSM8K test problems for the held-out loss")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument(
        "--em-limit", type=int, default=200, help="GSM8K test problems for exact match (0: skip)"
    )
    parser.add_argument("--shots", type=int, default=0, help="few-shot examples in the exact-match prompts")
    parser.add_argument("--dpo-pairs", type=int, default=150)
    parser.add_argument("--heldout-pairs", type=int, default=100)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--dpo-lr", type=float, default=5e-5)
    parser.add_argument("--max-chars", type=int, default=1200, help="longest HH-RLHF dialogue kept")
    args = parser.parse_args()
    if not args.quick and not (GSM8K_TRAIN.is_file() and HH.is_file()):
        raise SystemExit(f"needs {GSM8K_TRAIN} and {HH} (or --quick)")
    with tempfile.TemporaryDirectory(prefix="llmctl-bench-") as tmp:
        tmp = Path(tmp)
        model = bench_model(args.model, args.quick, tmp)
        print(f"model: {model}")
        lines = []
        if args.only in (None, "sft"):
            lines += run_sft(model, tmp, args)
            print("\n".join(lines), flush=True)
        if args.only in (None, "dpo"):
            dpo = run_dpo(model, tmp, args)
            print("\n".join(dpo), flush=True)
            lines += dpo
        # the last line carries a ratio (tests/test_benchmarks.py): keep the SFT one last when both ran
        if args.only is None:
            print(lines[len(lines) - len(dpo) - 1])


if __name__ == "__main__":
    main()
