"""llmctl tokenize vs the obvious script: AutoTokenizer called once per record in a Python loop.

Both run as fresh processes on the same JSONL input and write the same records (input_ids added) to a
file, so start-up and JSON I/O are counted on both sides. Prints MB/s, records/s and the ratio (median
of --repeats runs).

    python benchmarks/tokenize_throughput.py            # SmolLM2's tokenizer, GSM8K train (7,473 records)
    python benchmarks/tokenize_throughput.py --quick    # tiny model and synthetic data, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import bench_model

ROOT = Path(__file__).resolve().parent.parent
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"

PEER = """
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
with open(sys.argv[2], encoding="utf-8") as src, open(sys.argv[3], "w", encoding="utf-8") as dst:
    for line in src:
        record = json.loads(line)
        record["input_ids"] = tok(record["text"])["input_ids"]
        dst.write(json.dumps(record, ensure_ascii=False) + "\\n")
"""


def make_corpus(path: Path, quick: bool) -> int:
    with open(path, "w", encoding="utf-8") as out:
        if quick or not GSM8K.is_file():
            for i in range(300):
                out.write(
                    json.dumps(
                        {"id": i, "text": f"Record {i}: the quick brown fox jumps over {i} dogs. " * 4}
                    )
                    + "\n"
                )
        else:
            for i, line in enumerate(GSM8K.open(encoding="utf-8")):
                item = json.loads(line)
                out.write(json.dumps({"id": i, "text": item["question"] + "\n" + item["answer"]}) + "\n")
    return path.stat().st_size


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, synthetic data")
    parser.add_argument(
        "--model", help="tokenizer or model directory (default: SmolLM2, or llama-tiny with --quick)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="llmctl-bench-") as tmp:
        tmp = Path(tmp)
        model = bench_model(args.model, args.quick, tmp)
        corpus = tmp / "corpus.jsonl"
        size = make_corpus(corpus, args.quick)
        records = sum(1 for _ in corpus.open())
        repeats = 1 if args.quick else args.repeats
        ours = [
            timed([sys.executable, "-m", "llmctl", "tokenize", model, str(corpus), "-o", str(tmp / "a.jsonl"),
                   "--force", "--quiet"])
            for _ in range(repeats)
        ]  # fmt: skip
        peer = [
            timed([sys.executable, "-c", PEER, model, str(corpus), str(tmp / "b.jsonl")])
            for _ in range(repeats)
        ]
        a = [json.loads(line)["input_ids"] for line in (tmp / "a.jsonl").open()]
        b = [json.loads(line)["input_ids"] for line in (tmp / "b.jsonl").open()]
        if a != b:
            sys.exit("token ids differ between llmctl and the peer")
    t_ours, t_peer = statistics.median(ours), statistics.median(peer)
    mb = size / 1e6
    print(f"corpus: {records} records, {mb:.2f} MB; model: {model}; median of {repeats} run(s)")
    print(f"{'tool':<34}{'seconds':>10}{'MB/s':>10}{'records/s':>12}")
    for name, t in (("llmctl tokenize", t_ours), ("AutoTokenizer loop (peer)", t_peer)):
        print(f"{name:<34}{t:>10.2f}{mb / t:>10.2f}{records / t:>12.0f}")
    print(f"speed-up (peer time / llmctl time): {t_peer / t_ours:.2f}x; identical token ids: yes")


if __name__ == "__main__":
    main()
