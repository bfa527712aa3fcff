"""llmctl dedup (MinHash) vs datasketch used the obvious way, on the same corpus, same parameters.

The peer is what most scripts do: one ``datasketch.MinHash(num_perm=128)`` per document fed with
``update_batch`` of its word 5-gram shingles, then ``MinHashLSH(threshold=0.8)``: query, and insert when
nothing similar was seen. Both run as fresh processes on the same JSONL (start-up and JSON I/O counted)
and write the kept records. The corpus is GSM8K train (question + answer) plus one planted near-duplicate
per 10 documents at a known 5-gram Jaccard similarity; recall is the share of planted pairs above
threshold + 0.05 whose copy was removed. --scale N adds a run of llmctl alone on N synthetic documents
with its peak memory (RSS) per document.

    python benchmarks/dedup.py                      # GSM8K train + planted copies, 2 workers, median of 3
    python benchmarks/dedup.py --scale 1000000      # ... and a 1M-document synthetic corpus
    python benchmarks/dedup.py --docs 100000        # 100k GSM8K-sized documents for both tools
    python benchmarks/dedup.py --quick              # synthetic data, seconds; peer skipped if absent
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
THRESHOLD, NUM_PERM, NGRAM = 0.8, 128, 5

PEER = (
    """
import json, sys, unicodedata, re
from datasketch import MinHash, MinHashLSH
lsh = MinHashLSH(threshold={t}, num_perm={p})
with open(sys.argv[1], encoding="utf-8") as src, open(sys.argv[2], "w", encoding="utf-8") as dst:
    for i, line in enumerate(src):
        record = json.loads(line)
        words = re.sub(r"\\s+", " ", unicodedata.normalize("NFKC", record["text"]).lower()).split()
        grams = [" ".join(words[j:j + {n}]) for j in range(max(len(words) - {n} + 1, 1))]
        m = MinHash(num_perm={p})
        m.update_batch([g.encode("utf-8") for g in grams])
        if lsh.query(m):
            continue
        lsh.insert(str(i), m)
        dst.write(json.dumps(record, ensure_ascii=False) + "\\n")
""".replace("{t}", str(THRESHOLD))
    .replace("{p}", str(NUM_PERM))
    .replace("{n}", str(NGRAM))
)


LIBRARY = (
    """
import sys
from llmctl.core.dedup import DedupParams, apply_clustering, run_dedup
from llmctl.core.dedup.source import TwoPassInput
from llmctl.core.io import open_writer
source = TwoPassInput(sys.argv[1])
params = DedupParams(threshold={t}, num_perm={p}, ngram={n})
verify = len(sys.argv) > 4 and sys.argv[4] == "verify"
clustering = run_dedup(source.first_pass(), params, workers=int(sys.argv[3]), verify_jaccard=verify)
with open_writer(sys.argv[2], force=True) as writer:
    for record in apply_clustering(source.second_pass(), clustering, mark=False):
        writer.write(record)
""".replace("{t}", str(THRESHOLD))
    .replace("{p}", str(NUM_PERM))
    .replace("{n}", str(NGRAM))
)


def shingle_set(text: str) -> set[str]:
    words = " ".join(text.lower().split()).split()
    return {" ".join(words[j : j + NGRAM]) for j in range(max(len(words) - NGRAM + 1, 1))}


def plant(texts: list[str], rng: random.Random, every: int = 10) -> list[tuple[int, int, float]]:
    """Append an edited copy of every ``every``-th text at a target Jaccard in [0.5, 1]; return the pairs."""
    vocab = [w for t in texts[:2000] for w in t.split()]
    pairs = []
    for base in range(0, len(texts), every):
        target, original = rng.uniform(0.5, 1.0), shingle_set(texts[base])
        words, similarity = texts[base].split(), 1.0
        while similarity > target and len(words) > 10:
            i = rng.randrange(len(words))
            op = rng.random()
            if op < 0.5:
                words[i] = rng.choice(vocab)
            elif op < 0.75:
                words.insert(i, rng.choice(vocab))
            else:
                del words[i]
            similarity = len(original & shingle_set(" ".join(words))) / len(
                original | shingle_set(" ".join(words))
            )
        texts.append(" ".join(words))
        pairs.append((base, len(texts) - 1, similarity))
    return pairs


def make_corpus(path: Path, quick: bool, synthetic: int = 0, docs: int = 0) -> list[tuple[int, int, float]]:
    """The benchmark corpus: GSM8K train (or, with ``docs``, that many GSM8K-sized documents, each the
    question of one item and the answer of another, so they are distinct) plus planted near-duplicates."""
    rng = random.Random(0)
    if synthetic:
        vocab = [f"w{i}" for i in range(50_000)]
        with open(path, "w", encoding="utf-8") as out:
            for i in range(synthetic):
                out.write(json.dumps({"id": i, "text": " ".join(rng.choices(vocab, k=80))}) + "\n")
        return []
    if quick or not GSM8K.is_file():
        vocab = [f"w{i}" for i in range(3000)]
        texts = [" ".join(rng.choices(vocab, k=60)) for _ in range(300)]
    else:
        items = [json.loads(line) for line in GSM8K.open(encoding="utf-8")]
        texts = [r["question"] + "\n" + r["answer"] for r in items]
        if docs:
            base = int(docs / 1.1)  # plant() adds one copy per 10 documents
            pairs_seen = {(i, i) for i in range(len(items))}
            while len(texts) < base:
                q, a = rng.randrange(len(items)), rng.randrange(len(items))
                if (q, a) not in pairs_seen:
                    pairs_seen.add((q, a))
                    texts.append(items[q]["question"] + "\n" + items[a]["answer"])
    pairs = plant(texts, rng)
    with open(path, "w", encoding="utf-8") as out:
        for i, t in enumerate(texts):
            out.write(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n")
    return pairs


TEXT_DEDUP_VENV = Path.home() / ".cache" / "llmctl" / "venvs" / "text-dedup"
# text-dedup 0.4.0 pins pyspark, unisim and urllib3<=2 for modules its MinHash script does not import, so
# the package goes in without dependencies and MinHash's own imports are installed next to it.
TEXT_DEDUP_PACKAGES = [
    *("datasets", "xxhash", "click<9", "click-option-group<0.6", "tqdm", "rich<14", "numpy", "scipy"),
    *("regex", "bitarray", "ftfy", "fire<0.7", "psutil", "pybloom-live"),
]


def text_dedup_python() -> Path | None:
    """The Python of a venv holding text-dedup 0.4.0 (created on first use), or None if it cannot be made."""
    python = TEXT_DEDUP_VENV / "bin" / "python"
    if not python.is_file():
        try:
            subprocess.run([sys.executable, "-m", "venv", str(TEXT_DEDUP_VENV)], check=True)
            pip = [str(python), "-m", "pip", "install", "-q"]
            subprocess.run([*pip, "--no-deps", "text-dedup==0.4.0"], check=True)
            subprocess.run([*pip, *TEXT_DEDUP_PACKAGES], check=True)
        except subprocess.CalledProcessError:
            return None
    return python


def text_dedup_cmd(python: Path, corpus: Path, out: Path, workers: int) -> list[str]:
    return [str(python), "-m", "text_dedup.minhash", "--path", "json", "--data_files", str(corpus),
            "--split", "train", "--column", "text", "--output", str(out), "--num_perm", str(NUM_PERM),
            "--threshold", str(THRESHOLD), "--ngram", str(NGRAM), "--num_proc", str(workers),
            "--cache_dir", str(out.parent / "hf-cache")]  # fmt: skip


def text_dedup_ids(python: Path, out: Path, dst: Path) -> None:
    """Write text-dedup's kept records (a saved Hugging Face dataset) as JSONL with their ids."""
    code = (
        "import datasets, json, sys\n"
        "for r in datasets.load_from_disk(sys.argv[1]):\n    print(json.dumps({'id': r['id']}))"
    )
    with dst.open("w") as f:
        subprocess.run([str(python), "-c", code, str(out)], check=True, stdout=f)


def timed(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MiB of the child) for one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, max(peak, before) / 1024


def kept_records(path: Path) -> list[dict]:
    """The records of an output file (the CLI copies kept lines as they are; the library re-serialises)."""
    return [json.loads(line) for line in path.open(encoding="utf-8")]


def recall(out: Path, pairs: list[tuple[int, int, float]]) -> float:
    """The share of planted pairs above threshold + 0.05 of which exactly one record was kept (llmctl and the
    datasketch loop keep the earlier one; text-dedup keeps the later one)."""
    kept = {json.loads(line)["id"] for line in out.open(encoding="utf-8")}
    judged = [(a, b) for a, b, j in pairs if j > THRESHOLD + 0.05]
    return sum(1 for a, b in judged if (a in kept) != (b in kept)) / max(len(judged), 1)


def llmctl_cmd(corpus: Path, out: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "llmctl", "dedup", str(corpus), "--threshold", str(THRESHOLD),
            "--num-perm", str(NUM_PERM), "--ngram", str(NGRAM), "--workers", str(workers),
            "-o", str(out), "--force", "--quiet"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="synthetic data, seconds")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--scale", type=int, default=0, help="also dedup N synthetic documents (llmctl only)")
    parser.add_argument("--text-dedup", action="store_true", help="also run text-dedup 0.4.0 (own venv)")
    parser.add_argument(
        "--docs", type=int, default=0, help="~N GSM8K-sized documents instead of GSM8K train (both tools)"
    )
    args = parser.parse_args()
    have_peer = importlib.util.find_spec("datasketch") is not None
    repeats = 1 if args.quick else args.repeats
    with tempfile.TemporaryDirectory(prefix="llmctl-bench-") as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.jsonl"
        pairs = make_corpus(corpus, args.quick, docs=args.docs)
        docs = sum(1 for _ in corpus.open())
        ours = [timed(llmctl_cmd(corpus, tmp / "a.jsonl", args.workers))[0] for _ in range(repeats)]
        r_ours = recall(tmp / "a.jsonl", pairs)
        lib_cmd = [sys.executable, "-c", LIBRARY, str(corpus), str(tmp / "c.jsonl"), str(args.workers)]
        lib = [timed(lib_cmd)[0] for _ in range(repeats)]
        if kept_records(tmp / "c.jsonl") != kept_records(tmp / "a.jsonl"):
            sys.exit("the library run and the CLI run kept different records")
        verified = [
            timed([*lib_cmd[:-2], str(tmp / "v.jsonl"), str(args.workers), "verify"])[0]
            for _ in range(repeats)
        ]
        r_verified = recall(tmp / "v.jsonl", pairs)
        peer = []
        if have_peer:
            peer = [
                timed([sys.executable, "-c", PEER, str(corpus), str(tmp / "b.jsonl")])[0]
                for _ in range(repeats)
            ]
            r_peer = recall(tmp / "b.jsonl", pairs)
        text_dedup = None
        python = text_dedup_python() if args.text_dedup and not args.quick else None
        if python is not None:
            runs = []
            for _ in range(repeats):
                shutil.rmtree(tmp / "td", ignore_errors=True)
                runs.append(timed(text_dedup_cmd(python, corpus, tmp / "td", args.workers))[0])
            text_dedup_ids(python, tmp / "td", tmp / "td.jsonl")
            text_dedup = (statistics.median(runs), recall(tmp / "td.jsonl", pairs))
        scale_row = None
        if args.scale:
            big = tmp / "big.jsonl"
            make_corpus(big, False, synthetic=args.scale)
            seconds, peak = timed(llmctl_cmd(big, tmp / "big-out.jsonl", args.workers))
            scale_row = (args.scale, seconds, peak)
            os.unlink(big)
    print(f"corpus: {docs} documents ({len(pairs)} planted near-duplicates); threshold {THRESHOLD}, "
          f"{NUM_PERM} permutations, word {NGRAM}-grams; median of {repeats} run(s)")  # fmt: skip
    print(f"{'tool':<44}{'seconds':>9}{'docs/s':>10}{'recall':>8}")
    t_cli, t_ours = statistics.median(ours), statistics.median(lib)
    for name, t in (
        (f"llmctl dedup --workers {args.workers} (CLI)", t_cli),
        (f"llmctl.core.dedup, {args.workers} workers (library)", t_ours),
    ):
        print(f"{name:<44}{t:>9.2f}{docs / t:>10.0f}{r_ours:>8.3f}")  # fmt: skip
    t_verified = statistics.median(verified)
    name = f"llmctl.core.dedup, {args.workers} workers, --verify-jaccard"
    print(f"{name:<44}{t_verified:>9.2f}{docs / t_verified:>10.0f}{r_verified:>8.3f}")
    if scale_row:
        n, seconds, peak = scale_row
        print(f"{f'llmctl dedup, {n:,} synthetic docs':<44}{seconds:>9.2f}{n / seconds:>10.0f}{'':>8}"
              f"  peak RSS {peak:,.0f} MiB = {peak * 2**20 / n:,.0f} bytes/doc")  # fmt: skip
    if peer:
        t_peer = statistics.median(peer)
        name = "datasketch MinHash + MinHashLSH (peer)"
        print(f"{name:<44}{t_peer:>9.2f}{docs / t_peer:>10.0f}{r_peer:>8.3f}")
        if text_dedup:
            name = f"text-dedup 0.4.0 MinHash, {args.workers} processes"
            print(f"{name:<44}{text_dedup[0]:>9.2f}{docs / text_dedup[0]:>10.0f}{text_dedup[1]:>8.3f}")
            print(f"speed-up of the CLI vs text-dedup: {text_dedup[0] / t_cli:.2f}x")
        print(f"speed-up of the CLI (it pays llmctl's CLI start-up): {t_peer / t_cli:.2f}x")
        print(f"speed-up (peer time / llmctl library time): {t_peer / t_ours:.2f}x")
    else:
        print("peer (datasketch) not installed: skipped; speed-up 1.00x (nothing to compare)")


if __name__ == "__main__":
    main()
