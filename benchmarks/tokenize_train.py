"""llmctl tokenize-train vs Hugging Face tokenizers' BpeTrainer, byte-level BPE (GPT-2 split).

Three ways to train the same tokenizer on the same lines, each in a fresh process:

- the peer: a plain script around ``tokenizers`` (BpeTrainer + ``train_from_iterator``), what a user
  would write by hand;
- llmctl's ``hf`` engine (the default) and its ``reference`` engine (pure Python), through the library,
  timing training only (reading, counting, merging, building the tokenizer), like the peer's timing;
- ``llmctl tokenize-train`` end to end (process start, imports, writing the directory).

llmctl holds out one line in 100 to measure compression; the peer is given the same 99 lines in 100, so
all three learn the same merges (checked). Corpora: tiny Shakespeare at vocab 8192, and a ~50 MB text
assembled from ../shared/data (each source's text, repeated until 50 MB: realistic for reading and
counting, but with only the distinct words of ~12 MB of text). The reference engine runs on tiny
Shakespeare only (the goal: within 10x of HF).

    python benchmarks/tokenize_train.py            # full run (a few minutes on 2 cores)
    python benchmarks/tokenize_train.py --quick    # synthetic data, seconds
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"

PEER = """
import json, sys, time
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
path, vocab_size, out, pattern = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
start = time.perf_counter()
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.Sequence([
    pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
])
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
def lines():
    i = held = 0
    with open(path, "rb") as f:  # split on "\\n" only, as llmctl's reader does
        for raw in f:
            line = raw.decode("utf-8").rstrip("\\r\\n")
            if line.strip():
                if i % 100 == 99 and held < 1000:  # the lines llmctl holds out
                    held += 1
                else:
                    yield line
                i += 1
tok.train_from_iterator(lines(), trainer)
tok.save(out)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""

OURS = """
import json, sys, time
from llmctl.core.tokenize.train import Corpus, TrainOptions, train_tokenizer
path, vocab_size, out, engine = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
start = time.perf_counter()
options = TrainOptions(algo="bpe", vocab_size=vocab_size, engine=engine).resolved()
tok, summary = train_tokenizer(Corpus([path]), options)
tok.save(out)
print(json.dumps({"seconds": time.perf_counter() - start, "bytes_per_token": summary["bytes_per_token"]}))
"""


def synthetic(path: Path, lines: int) -> None:
    rng = random.Random(0)
    words = "the of and to in is was he for it with as his on be at by had are but from lower newest".split()
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(lines):
            f.write(" ".join(rng.choices(words, k=rng.randint(4, 16))) + ".\n")


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def source_texts() -> list[str]:
    """Every text in ../shared/data, one line per line of text."""
    texts: list[str] = []
    for path in sorted(DATA.rglob("*")):
        if path.suffix == ".txt":
            texts += path.read_text(encoding="utf-8").splitlines()
        elif path.name.endswith((".jsonl", ".jsonl.gz")):
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt", encoding="utf-8") as f:
                for line in f:
                    for s in _strings(json.loads(line)):
                        texts += s.splitlines()
    return [t for t in texts if t.strip()]


def assembled(path: Path, target_bytes: int) -> None:
    texts = source_texts()
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target_bytes:
            for t in texts:
                f.write(t + "\n")
                written += len(t.encode("utf-8")) + 1
                if written >= target_bytes:
                    break


def run_json(cmd: list[str]) -> tuple[float, dict]:
    start = time.perf_counter()
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.perf_counter() - start, json.loads(done.stdout.strip().splitlines()[-1])


def merges_of(path: Path) -> list:
    return json.loads(path.read_text(encoding="utf-8"))["model"]["merges"]


def bench(corpus: Path, vocab: int, repeats: int, tmp: Path, *, reference: bool) -> dict[str, dict]:
    from llmctl.core.tokenize.pretokenize import GPT2_PATTERN

    py = sys.executable
    results: dict[str, dict] = {}
    runs = {
        "HF tokenizers BpeTrainer (peer)": [py, "-c", PEER, str(corpus), str(vocab), str(tmp / "peer.json"),
                                            GPT2_PATTERN],
        "llmctl, hf engine": [py, "-c", OURS, str(corpus), str(vocab), str(tmp / "hf.json"), "hf"],
    }  # fmt: skip
    if reference:
        runs["llmctl, reference engine"] = [
            py,
            "-c",
            OURS,
            str(corpus),
            str(vocab),
            str(tmp / "ref.json"),
            "reference",
        ]
    for name, cmd in runs.items():
        train, wall = [], []
        for _ in range(repeats):
            w, out = run_json(cmd)
            train.append(out["seconds"])
            wall.append(w)
        results[name] = {"train": statistics.median(train), "wall": statistics.median(wall)}
    out = str(tmp / "cli")
    cli = [
        py,
        "-m",
        "llmctl",
        "tokenize-train",
        str(corpus),
        "--vocab-size",
        str(vocab),
        "-o",
        out,
        "--force",
        "-q",
    ]
    wall = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cli, check=True, capture_output=True)
        wall.append(time.perf_counter() - start)
    results["llmctl tokenize-train (CLI)"] = {"train": None, "wall": statistics.median(wall)}
    same = merges_of(tmp / "peer.json") == merges_of(tmp / "hf.json")
    if reference:
        same = same and merges_of(tmp / "ref.json") == merges_of(tmp / "hf.json")
    if not same:
        sys.exit(f"merges differ between the tools on {corpus}")
    return results


def table(title: str, results: dict[str, dict]) -> None:
    print(title)
    print(f"{'tool':<36}{'train s':>10}{'wall s':>10}")
    for name, r in results.items():
        train = f"{r['train']:.2f}" if r["train"] is not None else "-"
        print(f"{name:<36}{train:>10}{r['wall']:>10.2f}")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="synthetic data, small vocabulary")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--large-mb", type=float, default=50.0, help="size of the assembled corpus (0: skip)")
    args = parser.parse_args()
    import tokenizers

    with tempfile.TemporaryDirectory(prefix="llmctl-bench-") as tmp:
        tmp = Path(tmp)
        small = tmp / "small.txt"
        if args.quick or not SHAKESPEARE.is_file():
            synthetic(small, 2000)
            vocab, repeats, name = 400, 1, "synthetic (2,000 lines)"
        else:
            small.write_bytes(SHAKESPEARE.read_bytes())
            vocab, repeats, name = args.vocab_size, args.repeats, "tiny Shakespeare"
        print(
            f"tokenizers {tokenizers.__version__}; byte-level BPE, GPT-2 split; median of {repeats} run(s)\n"
        )
        small_results = bench(small, vocab, repeats, tmp, reference=True)
        table(f"{name}: {small.stat().st_size / 1e6:.2f} MB, vocab {vocab}", small_results)
        if not args.quick and args.large_mb > 0 and DATA.is_dir():
            large = tmp / "large.txt"
            assembled(large, int(args.large_mb * 1e6))
            large_results = bench(large, vocab, repeats, tmp, reference=False)
            table(
                f"../shared/data assembled: {large.stat().st_size / 1e6:.1f} MB, vocab {vocab}", large_results
            )
    peer = small_results["HF tokenizers BpeTrainer (peer)"]["train"]
    ref = small_results["llmctl, reference engine"]["train"]
    hf = small_results["llmctl, hf engine"]["train"]
    print("identical merges: yes")
    print(
        f"{name}: llmctl hf engine / peer {hf / peer:.2f}x; "
        f"reference engine / peer {ref / peer:.2f}x (goal <= 10x)"
    )


if __name__ == "__main__":
    main()
