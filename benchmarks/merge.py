"""llmctl merge vs mergekit (mergekit-yaml): wall time and peak RSS for each merge method.

A base model and two "fine-tunes" made by adding seeded noise to every tensor of the base; each method
merges them with the same recipe in both tools, as fresh processes (start-up counted on both sides). The
outputs are compared tensor by tensor (allclose 1e-6; random DARE masks are not compared).

    python benchmarks/merge.py            # SmolLM2-135M-Instruct (fetch_smollm2), all methods
    python benchmarks/merge.py --quick    # llama-tiny, TIES only, seconds; mergekit skipped if absent
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = {
    "linear": ("", {"weight": 0.5}, False),
    "task_arithmetic": ("base", {"weight": 0.5}, False),
    "ties": ("base", {"weight": 0.5, "density": 0.5}, False),
    "dare_ties": ("base", {"weight": 0.5, "density": 0.5}, True),
    "dare_linear": ("base", {"weight": 0.5, "density": 0.5}, True),
    "slerp": ("base", {}, False),
    "breadcrumbs": ("base", {"weight": 0.5, "density": 0.9, "gamma": 0.01}, False),
    "model_stock": ("base", {}, False),
}


def make_finetunes(base: Path, root: Path, n: int = 2, scale: float = 0.01) -> list[Path]:
    """Copies of ``base`` with seeded Gaussian noise (``scale`` x each tensor's std) on every tensor."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(base / "model.safetensors")
    out = []
    for i in range(n):
        target = root / f"ft{i + 1}"
        shutil.copytree(base, target, ignore=shutil.ignore_patterns("*.safetensors", "llmctl.json"))
        g = torch.Generator().manual_seed(i + 1)
        noisy = {}
        for name, t in tensors.items():
            noise = torch.randn(t.shape, generator=g, dtype=torch.float32) * (scale * t.float().std())
            noisy[name] = (t.float() + noise).to(t.dtype)
        save_file(noisy, target / "model.safetensors", metadata={"format": "pt"})
        del noisy
        out.append(target)
    return out


def recipe(method: str, base: Path, fts: list[Path]) -> str:
    role, params, _ = METHODS[method]
    lines = [f"merge_method: {method}", "dtype: float32"]
    models = list(fts)
    if role == "base":
        lines.append(f"base_model: {base}")
    if method == "slerp":
        models = [base, fts[0]]
        lines.append("parameters: {t: [0, 0.5, 1]}")
    lines.append("models:")
    for m in models:
        p = ", ".join(f"{k}: {v}" for k, v in params.items())
        lines.append(f"  - model: {m}" + (f"\n    parameters: {{{p}}}" if p and m != base else ""))
    return "\n".join(lines) + "\n"


# A fresh, small process starts each tool and reads its peak RSS with wait4: Linux carries a parent's
# peak RSS into its children across fork and exec, so measuring from this (large) process would inflate
# both tools by the same amount.
LAUNCHER = """
import os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = proc.stderr.read()
_, status, usage = os.wait4(proc.pid, 0)
code = os.waitstatus_to_exitcode(status)
if code:
    sys.exit(err.decode(errors="replace")[-2000:])
print(time.perf_counter() - start, usage.ru_maxrss / 1024)
"""


def measure(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one process."""
    done = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr}")
    wall, rss = done.stdout.split()
    return float(wall), float(rss)


def same_tensors(a: Path, b: Path) -> bool:
    import torch

    from llmctl.core.merge.loader import LazyModel

    x, y = LazyModel(a), LazyModel(b)
    if sorted(x.names()) != sorted(y.names()):
        return False
    return all(torch.allclose(x.get(n), y.get(n), atol=1e-6, rtol=1e-6) for n in x.names())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="llama-tiny, TIES only")
    parser.add_argument("--methods", default=None, help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    methods = args.methods.split(",") if args.methods else (["ties"] if args.quick else list(METHODS))
    peer = Path(sys.executable).parent / "mergekit-yaml"
    have_peer = peer.is_file()
    rows = []
    with tempfile.TemporaryDirectory(prefix="llmctl-bench-merge-") as tmp:
        tmp = Path(tmp)
        if args.quick:
            base = tmp / "base"
            subprocess.run([sys.executable, "-m", "llmctl", "init", "-o", base, "--quiet"], check=True)
            label = "llama-tiny"
        else:
            from llmctl.core.models.smollm2 import fetch_smollm2

            base = fetch_smollm2()
            label = "SmolLM2-135M-Instruct (float32)"
        fts = make_finetunes(base, tmp)
        for method in methods:
            config = tmp / f"{method}.yml"
            config.write_text(recipe(method, base, fts))
            ours, theirs = [], []
            for _ in range(1 if args.quick else args.repeats):
                shutil.rmtree(tmp / "ours", ignore_errors=True)
                ours.append(
                    measure(
                        [
                            sys.executable,
                            "-m",
                            "llmctl",
                            "merge",
                            "--config",
                            str(config),
                            "-o",
                            str(tmp / "ours"),
                            "--quiet",
                        ]
                    )
                )
                if have_peer:
                    shutil.rmtree(tmp / "theirs", ignore_errors=True)
                    theirs.append(measure([str(peer), str(config), str(tmp / "theirs")]))
            equal = "-"
            if have_peer:
                random = METHODS[method][2]
                equal = (
                    "random" if random else ("yes" if same_tensors(tmp / "ours", tmp / "theirs") else "NO")
                )
            rows.append((method, ours, theirs, equal))
    print(
        f"model: {label}; base + 2 noisy fine-tunes; median of {1 if args.quick else args.repeats} run(s); "
        "speed-up = mergekit time / llmctl time, memory = mergekit peak RSS / llmctl peak RSS"
    )
    print(
        f"{'method':<16}{'llmctl s':>10}{'mergekit s':>12}{'llmctl MiB':>12}{'mergekit MiB':>14}"
        f"{'speed-up':>10}{'memory':>8}{'equal':>8}"
    )
    speedups = []
    for method, ours, theirs, equal in rows:
        t_o, m_o = statistics.median(x[0] for x in ours), statistics.median(x[1] for x in ours)
        if theirs:
            t_t, m_t = statistics.median(x[0] for x in theirs), statistics.median(x[1] for x in theirs)
            speedups.append(t_t / t_o)
            print(
                f"{method:<16}{t_o:>10.2f}{t_t:>12.2f}{m_o:>12.0f}{m_t:>14.0f}{t_t / t_o:>9.2f}x"
                f"{m_t / m_o:>7.2f}x{equal:>8}"
            )
        else:
            print(f"{method:<16}{t_o:>10.2f}{'-':>12}{m_o:>12.0f}{'-':>14}{'-':>10}{'-':>8}{equal:>8}")
    if speedups:
        print(
            f"geometric-mean speed-up (mergekit time / llmctl time): "
            f"{statistics.geometric_mean(speedups):.2f}x over {len(speedups)} method(s)"
        )
    else:
        print("mergekit not installed (pip install mergekit): llmctl only; speed-up 1.00x by definition")


if __name__ == "__main__":
    main()
