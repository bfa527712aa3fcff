"""llmctl eval vs lm-evaluation-harness on the same model and the same local files: numbers and time.

Three tasks, each run by both tools with the same definitions (task YAMLs written for lm-eval here):
perplexity over WikiText-2 test lines, ARC-Easy multiple choice (MosaicML's reformat) and a GSM8K slice
(greedy generation, exact match). lm-eval runs from its own virtual environment under
``~/.cache/llmctl/venvs/lm-eval`` (created on first use, never by the tests) as ``lm_eval --model hf``.

    python benchmarks/eval_vs_lm_eval.py                  # SmolLM2-135M-Instruct, ../shared/data
    python benchmarks/eval_vs_lm_eval.py --quick          # llama-tiny, tiny synthetic data, no lm-eval
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import bench_model

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
VENV = Path(os.environ.get("LLMCTL_CACHE") or "~/.cache/llmctl").expanduser() / "venvs" / "lm-eval"

TASKS = {
    "ppl": {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [
            {"metric": "word_perplexity"},
            {"metric": "byte_perplexity"},
            {"metric": "bits_per_byte"},
        ],
    },
    "arc": {
        "output_type": "multiple_choice",
        "doc_to_text": "{{query}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    },
    "gsm": {
        "output_type": "generate_until",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {
            "until": ["Question:", "</s>", "<|im_end|>"],
            "do_sample": False,
            "max_gen_toks": 96,
        },
        "filter_list": [
            {
                "name": "strict-match",
                "filter": [
                    {"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                    {"function": "take_first"},
                ],
            },
            {
                "name": "flexible-extract",
                "filter": [
                    {"function": "regex", "group_select": -1, "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                    {"function": "take_first"},
                ],
            },
        ],
        "metric_list": [
            {
                "metric": "exact_match",
                "ignore_case": True,
                "ignore_punctuation": False,
                "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"],
            }
        ],
    },
}


def write_inputs(tmp: Path, quick: bool, limits: dict[str, int]) -> dict[str, Path]:
    files = {}
    if quick:
        texts = [f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(6)]
        arc = [
            {"query": f"Question: {i} + 1?", "choices": [str(i + 1), str(i + 2)], "gold": 0} for i in range(6)
        ]
        gsm = [{"question": f"{i} + 1?", "answer": f"#### {i + 1}"} for i in range(2)]
    else:
        lines = [x for x in (DATA / "wikitext-2" / "test.txt").read_text().splitlines() if x.strip()]
        texts = lines[: limits["ppl"]]
        arc = [json.loads(x) for x in (DATA / "arc-easy" / "arc_easy.jsonl").open()][: limits["arc"]]
        gsm = [json.loads(x) for x in (DATA / "gsm8k" / "test.jsonl").open()][: limits["gsm"]]
    for name, docs in (("ppl", [{"text": t} for t in texts]), ("arc", arc), ("gsm", gsm)):
        path = tmp / f"{name}.jsonl"
        path.write_text("".join(json.dumps(d) + "\n" for d in docs))
        files[name] = path
    for name, spec in TASKS.items():
        task = {
            "task": f"bench_{name}",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(files[name])}},
            "test_split": "test",
            **spec,
        }
        (tmp / f"bench_{name}.yaml").write_text(json.dumps(task))  # JSON is YAML
    return files


def run_llmctl(model: str, tmp: Path, name: str, batch: int, max_length: int) -> tuple[dict, float]:
    out = tmp / f"llmctl-{name}.json"
    cmd = [
        sys.executable,
        "-m",
        "llmctl",
        "eval",
        model,
        "--task",
        str(tmp / f"bench_{name}.yaml"),
        "--batch-size",
        str(batch),
        "--max-length",
        str(max_length),
        "-o",
        str(out),
        "--force",
        "--quiet",
        "--device",
        "cpu",
        "--dtype",
        "float32",
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())["results"][f"bench_{name}"], time.perf_counter() - start


def ensure_venv() -> Path | None:
    python = VENV / "bin" / "python"
    if (VENV / "bin" / "lm_eval").exists():
        return python
    print(f"creating {VENV} for lm-eval (once) ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + ["transformers==5.24.0", "lm_eval==0.4.13", "datasets", "accelerate"], check=True)
    return python


def run_lm_eval(model: str, tmp: Path, name: str, batch: int, max_length: int) -> tuple[dict, float]:
    out = tmp / f"lm-eval-{name}"
    cmd = [
        str(VENV / "bin" / "lm_eval"),
        "--model",
        "hf",
        "--model_args",
        f"pretrained={model},dtype=float32,max_length={max_length}",
        "--tasks",
        f"bench_{name}",
        "--include_path",
        str(tmp),
        "--device",
        "cpu",
        "--batch_size",
        str(batch),
        "--output_path",
        str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    elapsed = time.perf_counter() - start
    result = json.loads(sorted(out.rglob("results_*.json"))[-1].read_text())
    return result["results"][f"bench_{name}"], elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--limit-ppl", type=int, default=200)
    parser.add_argument("--limit-arc", type=int, default=200)
    parser.add_argument("--limit-gsm", type=int, default=10)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="llmctl-bench-eval-"))
    model = bench_model(args.model, args.quick, tmp)
    write_inputs(tmp, args.quick, {"ppl": args.limit_ppl, "arc": args.limit_arc, "gsm": args.limit_gsm})
    peer = None if args.quick else ensure_venv()
    print(f"model {model}; batch {args.batch_size}; max_length {args.max_length}")
    header = ("task", "metric", "llmctl", "lm-eval", "rel diff", "llmctl s", "lm-eval s")
    print(
        f"{header[0]:<6}{header[1]:<34}"
        + "".join(f"{h:>14}" for h in header[2:4])
        + "".join(f"{h:>10}" for h in header[4:])
    )
    speedups = []
    for name in TASKS:
        ours, t_ours = run_llmctl(model, tmp, name, args.batch_size, args.max_length)
        theirs, t_theirs = (
            run_lm_eval(model, tmp, name, args.batch_size, args.max_length) if peer else ({}, None)
        )
        for key, value in ours.items():
            if key == "alias" or "_stderr" in key or not isinstance(value, float):
                continue
            other = theirs.get(key)
            diff = f"{abs(value - other) / max(abs(other), 1e-12):.1e}" if isinstance(other, float) else "-"
            shown = f"{other:.6f}" if isinstance(other, float) else "-"
            print(
                f"{name:<6}{key:<34}{value:>14.6f}{shown:>14}{diff:>10}{t_ours:>10.1f}"
                f"{(t_theirs or float('nan')):>10.1f}"
            )
        if t_theirs:
            speedups.append(f"{name} {t_theirs / t_ours:.2f}x")
    print(
        "speed-up (lm-eval time / llmctl time): "
        + (", ".join(speedups) if speedups else "peer skipped, 1.00x")
    )


if __name__ == "__main__":
    main()
