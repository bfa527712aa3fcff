"""llmctl quantize: perplexity, wall time, peak RSS and size of RTN vs GPTQ vs AWQ vs bitsandbytes NF4
(vs llm-compressor).

Each configuration runs in a fresh process: quantize (llmctl's library, the same path as the CLI), write
the checkpoint, load it back as ``llmctl eval`` does (``load_model``: llmctl's QuantLinear for GPTQ/AWQ/
compressed-tensors, transformers + bitsandbytes for NF4), score held-out text with llmctl eval's rolling
perplexity scorer, and time greedy generation through llmctl's own engine (``llmctl generate``'s
``load_engine``; bitsandbytes checkpoints, which the engine does not run, through transformers
instead). Calibration and evaluation text are disjoint slices of WikiText-2 (tokenized v1 test split,
../shared/data/wikitext-2/test.txt: perplexities are not comparable with published raw-WikiText numbers).

    python benchmarks/quantize.py            # SmolLM2-135M-Instruct, 4- and 3-bit g64, NF4, ~1 h on 2 CPUs
    python benchmarks/quantize.py --quick    # llama-tiny, built-in text, seconds

llm-compressor (the peer) pins transformers <= 5.17, so it runs only from its own virtual environment
``~/.cache/llmctl/venvs/llmcompressor`` when that exists (``--setup-peer`` creates it; never in CI).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import bench_model

ROOT = Path(__file__).resolve().parent.parent
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"
HELD_OUT_LINES = 120  # the first articles, ~3k tokens: 7 configurations must fit an hour on 2 busy CPUs
PEER_VENV = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmctl" / "venvs" / "llmcompressor"
)


def texts(quick: bool, tmp: Path, held_out_lines: int = HELD_OUT_LINES) -> tuple[Path | None, str]:
    """(calibration JSONL or None for the built-in text, held-out evaluation text)."""
    if quick or not WIKITEXT.is_file():
        from llmctl.core.quantize.calib import BUILTIN_TEXT

        return None, BUILTIN_TEXT * 3
    lines = WIKITEXT.read_text(encoding="utf-8").splitlines()
    held_out = "\n".join(lines[:held_out_lines])  # the first articles are scored
    calib = tmp / "calib.jsonl"
    with calib.open("w", encoding="utf-8") as f:  # the rest calibrates
        for line in lines[held_out_lines:]:
            if line.strip():
                f.write(json.dumps({"text": line}) + "\n")
    return calib, held_out


WORKER = r"""
import json, resource, sys, time
from pathlib import Path
import torch
args = json.loads(sys.argv[1])
from llmctl.core.eval.scoring import Scorer
from llmctl.core.models.hf import load_model, load_tokenizer, resolve_model
from llmctl.core.errors import ModelError
from llmctl.core.generate.engine import Request, generate
from llmctl.core.generate.run import load_engine
from llmctl.core.generate.sampling import SamplingParams
from llmctl.core.quantize import CalibrationSpec, QuantizeOptions, quantize_model
torch.manual_seed(0)
out = {"seconds": 0.0, "size_bytes": None}
if args["method"] == "fp32":
    model = load_model(resolve_model(args["model"]), device="cpu", dtype="float32")
    out["size_bytes"] = sum(p.stat().st_size for p in Path(args["model"]).glob("*.safetensors"))
else:
    calib = CalibrationSpec(args["calib"] and Path(args["calib"]), "text", args["samples"], args["seq_len"])
    opts = QuantizeOptions(method=args["method"], bits=args["bits"], group_size=args["group"],
                           fmt=args.get("format"), calib=calib,
                           true_sequential=args.get("true_sequential", True))
    t0 = time.perf_counter()
    summary = quantize_model(args["model"], Path(args["out"]), opts, force=True)
    out["total_seconds"] = time.perf_counter() - t0  # with loading the model and writing the checkpoint
    out["seconds"] = summary["quantize_seconds"]  # calibration data + quantization: what oneshot times
    out["size_bytes"] = summary["size_bytes"]
    out["rss_quantize_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model = load_model(resolve_model(args["out"]), device="cpu", dtype="float32")
tok = load_tokenizer(resolve_model(args["model"]))
scorer = Scorer(model, tok, args["max_length"], batch_size=4)
(ll, n), = scorer.rolling_loglikelihoods([Path(args["text"]).read_text(encoding="utf-8")])
out["ppl"] = float(torch.exp(torch.tensor(-ll / n)))
out["tokens"] = n
ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
n_new = args["gen_tokens"]
try:  # llmctl's engine (llmctl generate / serve)
    del model
    engine = load_engine(args["model"] if args["method"] == "fp32" else args["out"], device="cpu",
                         dtype="float32")
    request = [Request(ids[0].tolist(), SamplingParams(max_tokens=n_new, ignore_eos=True))]
    generate(engine, [Request(ids[0].tolist(), SamplingParams(max_tokens=2, ignore_eos=True))])  # warm-up
    t0 = time.perf_counter()
    (done,) = generate(engine, request)
    out["gen_tok_s"] = len(done.token_ids) / (time.perf_counter() - t0)
    out["gen_via"] = "llmctl"
except ModelError:  # bitsandbytes: transformers' generate
    source = args["model"] if args["method"] == "fp32" else args["out"]
    model = load_model(resolve_model(source), device="cpu", dtype="float32")
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, do_sample=False)
        t0 = time.perf_counter()
        gen = model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        out["gen_tok_s"] = (gen.shape[1] - ids.shape[1]) / (time.perf_counter() - t0)
    out["gen_via"] = "transformers"
out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps(out))
"""

PEER = r"""
import json, resource, sys, time
args = json.loads(sys.argv[1])
import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(args["model"])
model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)
ids = []
for line in open(args["calib"]):
    ids += tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
L = args["seq_len"]
rows = [ids[i * L:(i + 1) * L] for i in range(args["samples"])]
ds = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * L for _ in rows]})
t0 = time.perf_counter()
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
    num_bits=args["bits"], type="int", symmetric=True, strategy="group", group_size=args["group"]))
recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], dampening_frac=0.01)
oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(rows), max_seq_length=L)
seconds = time.perf_counter() - t0
model.save_pretrained(args["out"], save_compressed=True)
tok.save_pretrained(args["out"])
print("RESULT " + json.dumps({"seconds": seconds,
                              "rss_quantize_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_worker(args: dict, python: str = sys.executable, code: str = WORKER) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([python, "-c", code, json.dumps(args)], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"worker failed ({args.get('method')}):\n{proc.stderr[-3000:]}")


def setup_peer() -> None:
    """llm-compressor in its own venv, on this venv's CPU build of torch: torch is installed first at the
    exact version running here (a ``+cpu`` local version: pip's find-links or PyTorch's CPU index), then
    pinned by a constraints file, so resolving llmcompressor can never swap in PyPI's CUDA wheel; the
    check at the end refuses a venv whose torch was built for CUDA."""
    import torch

    python = str(PEER_VENV / "bin" / "python")
    subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    pip = [python, "-m", "pip", "install", "-q"]
    pin = f"torch=={torch.__version__}"
    if subprocess.run([*pip, pin]).returncode:  # not in the local wheels: PyTorch's CPU index
        subprocess.run([*pip, pin, "--extra-index-url", "https://download.pytorch.org/whl/cpu"], check=True)
    constraints = PEER_VENV / "constraints.txt"
    constraints.write_text(pin + "\n")
    subprocess.run([*pip, "llmcompressor", "datasets", "-c", str(constraints)], check=True)
    cuda = subprocess.run(
        [python, "-c", "import torch; print(torch.version.cuda)"], check=True, capture_output=True, text=True
    ).stdout.strip()
    if cuda != "None":
        raise SystemExit(f"{PEER_VENV}: its torch was built for CUDA {cuda}; delete the venv and retry")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny model and text, seconds")
    parser.add_argument("--model", help="model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--samples", type=int, default=32, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    parser.add_argument("--held-out-lines", type=int, default=HELD_OUT_LINES, help="WikiText-2 lines scored")
    parser.add_argument("--fp8", action="store_true", help="also run FP8 (compressed-tensors)")
    parser.add_argument(
        "--no-true-sequential", action="store_true",
        help="GPTQ: calibrate all of a layer's linears on the floating-point layer, as llm-compressor does",
    )  # fmt: skip
    parser.add_argument("--only", help="comma-separated subset, e.g. fp32,rtn4,gptq4,awq4,bnb-nf44")
    parser.add_argument("--setup-peer", action="store_true", help="create llm-compressor's own venv first")
    a = parser.parse_args()
    if a.setup_peer:
        setup_peer()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = bench_model(a.model, a.quick, tmp)
        calib, held_out = texts(a.quick, tmp, a.held_out_lines)
        text_path = tmp / "held_out.txt"
        text_path.write_text(held_out, encoding="utf-8")
        samples, seq_len = (4, 64) if a.quick else (a.samples, a.seq_len)
        group = 32 if a.quick else 64  # SmolLM2's hidden size 576 is not a multiple of 128
        configs = [("fp32", 32, None)]
        for bits in (4,) if a.quick else (4, 3):
            configs += [
                ("rtn", bits, "gptq"),
                ("gptq", bits, "gptq"),
                ("awq", bits, "awq" if bits == 4 else "gptq"),
            ]
        configs.append(("bnb-nf4", 4, "bitsandbytes"))
        if a.fp8:
            configs.append(("fp8", 8, "compressed-tensors"))
        base = {"model": model, "calib": calib and str(calib), "samples": samples, "seq_len": seq_len,
                "group": group, "text": str(text_path), "max_length": 128 if a.quick else 512,
                "gen_tokens": 8 if a.quick else 32, "true_sequential": not a.no_true_sequential}  # fmt: skip
        if a.only:
            wanted = a.only.split(",")
            configs = [c for c in configs if (c[0] if c[0] == "fp32" else f"{c[0]}{c[1]}") in wanted]
        rows = []
        for method, bits, fmt in configs:
            args = {
                **base,
                "method": method,
                "bits": bits,
                "format": fmt,
                "out": str(tmp / f"{method}{bits}"),
            }
            r = run_worker(args)
            rows.append((f"llmctl {method}" + ("" if method == "fp32" else f" {bits}-bit"), bits, r))
            print(f"  {rows[-1][0]}: {json.dumps(r)}", file=sys.stderr, flush=True)
        peer_python = PEER_VENV / "bin" / "python"
        peer = None
        if not a.quick and calib and peer_python.is_file():
            out = tmp / "peer-gptq4"
            p = run_worker({**base, "bits": 4, "out": str(out)}, python=str(peer_python), code=PEER)
            r = run_worker({**base, "method": "fp32", "model": str(out)})  # transformers + compressed-tensors
            r.update(p, size_bytes=sum(f.stat().st_size for f in out.glob("*.safetensors")))
            peer = ("llm-compressor gptq 4-bit", 4, r)
            rows.append(peer)
    tokens = rows[0][2]["tokens"]
    print(f"model: {model}; group size {group}; calibration {samples}x{seq_len} tokens; "
          f"held-out text {tokens:,} tokens")  # fmt: skip
    print(f"{'configuration':<28}{'ppl':>9}{'quant s':>9}{'peak RSS MB':>13}{'size MB':>9}{'gen tok/s':>11}")
    for name, _, r in rows:
        rss = r.get("rss_quantize_mb", r["rss_mb"])
        size = (r["size_bytes"] or 0) / 1e6
        via = "" if r.get("gen_via", "llmctl") == "llmctl" else f" ({r['gen_via']})"
        print(
            f"{name:<28}{r['ppl']:>9.3f}{r['seconds']:>9.1f}{rss:>13.0f}{size:>9.1f}{r['gen_tok_s']:>11.1f}{via}"
        )
    print("gen tok/s: llmctl's engine (llmctl generate), batch 1, greedy; peak RSS: the quantizing process;")
    print("quant s: calibration data + quantization (llmctl's quantize_seconds, llm-compressor's oneshot),")
    print("without loading the model or writing the checkpoint")
    if peer is None and not a.quick:
        print(f"llm-compressor: not run (no venv at {PEER_VENV}; --setup-peer creates it)")
    ppl = {name: r["ppl"] for name, _, r in rows}
    if "llmctl rtn 4-bit" not in ppl or "llmctl gptq 4-bit" not in ppl:
        print("ratio: n/a (rtn and gptq 4-bit not both run) 1.00x")
        return
    ratio_rtn = ppl["llmctl gptq 4-bit"] / ppl["llmctl rtn 4-bit"]
    line = f"GPTQ/RTN 4-bit perplexity {ratio_rtn:.3f}x"
    if "llmctl awq 4-bit" in ppl:
        line += f"; AWQ/RTN {ppl['llmctl awq 4-bit'] / ppl['llmctl rtn 4-bit']:.3f}x"
    if peer:
        line += f"; llmctl GPTQ / llm-compressor GPTQ ppl {ppl['llmctl gptq 4-bit'] / peer[2]['ppl']:.3f}x"
        gptq4 = next(r for name, _, r in rows if name == "llmctl gptq 4-bit")
        line += f", time {gptq4['seconds'] / peer[2]['seconds']:.2f}x"
    print(line)
    assert math.isfinite(ratio_rtn)


if __name__ == "__main__":
    main()
