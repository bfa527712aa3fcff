"""``quantize_model``: load a model, quantize its decoder linears with one method, write one format.

Methods (the registry): ``rtn`` (round to nearest), ``gptq``, ``awq``, ``fp8``. Data-aware methods walk
the decoder layers with :func:`llmctl.core.quantize.calib.run_layerwise`, so every layer is calibrated on
the outputs of the already-quantized layers before it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmctl.core.errors import UsageError
from llmctl.core.quantize import bnb
from llmctl.core.quantize import formats as F
from llmctl.core.quantize.calib import (
    CalibrationSpec,
    LayerInputs,
    calibration_ids,
    decoder_layers,
    linears_of,
    run_layerwise,
)
from llmctl.core.quantize.rtn import SUPPORTED_BITS, check_group_size, fp8_quantize, rtn_quantize


@dataclass(frozen=True)
class Method:
    name: str
    url: str
    calibrated: bool
    default_format: str
    default_sym: bool


METHODS = {
    "rtn": Method("rtn", "https://arxiv.org/abs/2210.17323 (baseline)", False, "gptq", True),
    "gptq": Method("gptq", "https://arxiv.org/abs/2210.17323", True, "gptq", True),
    "awq": Method("awq", "https://arxiv.org/abs/2306.00978", True, "awq", False),
    "fp8": Method("fp8", "https://arxiv.org/abs/2209.05433", False, "compressed-tensors", True),
    "bnb-nf4": Method("bnb-nf4", "https://arxiv.org/abs/2305.14314", False, "bitsandbytes", True),
    "bnb-int8": Method("bnb-int8", "https://arxiv.org/abs/2208.07339", False, "bitsandbytes", True),
}
BNB_FORMAT = "bitsandbytes"  # what transformers writes for a BitsAndBytesConfig model (quantize/bnb.py)
# True-sequential order inside a Llama-like layer: each set is quantized on inputs from the sets before it.
SEQUENTIAL = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json", "added_tokens.json",
)  # fmt: skip


@dataclass
class QuantizeOptions:
    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool | None = None  # None: the method's default
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    true_sequential: bool = True
    fmt: str | None = None  # None: the method's default
    skip: list[str] = field(default_factory=list)
    calib: CalibrationSpec = field(default_factory=CalibrationSpec)
    batch_size: int = 8

    def resolved(self) -> QuantizeOptions:
        if self.method not in METHODS:
            raise UsageError(f"unknown --method {self.method!r}; choose one of {', '.join(METHODS)}")
        m = METHODS[self.method]
        out = QuantizeOptions(**{**self.__dict__})
        out.sym = m.default_sym if self.sym is None else self.sym
        out.fmt = self.fmt or m.default_format
        if self.method in bnb.KINDS:
            if out.fmt != BNB_FORMAT:
                raise UsageError(f"--method {self.method} writes --format {BNB_FORMAT} only")
            if out.act_order:
                raise UsageError("--act-order applies to --method gptq only")
            out.bits, out.group_size = (4, bnb.NF4_BLOCKSIZE) if self.method == "bnb-nf4" else (8, -1)
            return out
        if out.fmt not in F.FORMATS:
            raise UsageError(f"unknown --format {out.fmt!r}; choose one of {', '.join(F.FORMATS)}")
        if self.method == "fp8":
            if out.fmt != "compressed-tensors":
                raise UsageError("--method fp8 writes --format compressed-tensors only")
            out.bits, out.group_size = 8, -1
        elif self.bits not in SUPPORTED_BITS:
            raise UsageError(f"--bits {self.bits} is not supported; choose one of 2, 3, 4, 8")
        if out.fmt == "awq" and (out.bits != 4 or out.sym or out.act_order):
            raise UsageError(
                "--format awq stores asymmetric 4-bit weights without act-order; use --format gptq"
            )
        if out.fmt == "compressed-tensors" and out.act_order:
            raise UsageError("--act-order is written in --format gptq only")
        if self.method == "awq" and out.sym:
            raise UsageError("awq quantizes asymmetrically (zero points); drop --sym")
        if out.act_order and self.method != "gptq":
            raise UsageError("--act-order applies to --method gptq only")
        if self.damp <= 0:
            raise UsageError("--damp must be positive")
        return out


def _quantizable(model, opts: QuantizeOptions) -> dict[str, nn.Linear]:
    """The linears to quantize, by full module name; checks shapes before any work is done."""
    layers = decoder_layers(model)
    prefix = next(name for name, m in model.named_modules() if m is layers)
    found: dict[str, nn.Linear] = {}
    for i, layer in enumerate(layers):
        for name, lin in linears_of(layer, opts.skip).items():
            full = f"{prefix}.{i}.{name}"
            n, k = lin.weight.shape
            if opts.method not in ("fp8", *bnb.KINDS):
                check_group_size(k, opts.group_size, full)
                if (k * opts.bits) % 32 or (opts.fmt == "gptq" and (n * opts.bits) % 32):
                    raise UsageError(f"{full} ({n}x{k}) cannot be packed in {opts.bits}-bit int32 words")
            found[full] = lin
    if not found:
        raise UsageError("no linear layers left to quantize (check --skip)")
    return found


def _store(lin: nn.Linear, qw, fmt: str | None = None):
    """Put the dequantized weight back into the fp model (later layers calibrate on it)."""
    if fmt == "gptq" and not qw.sym:
        F.v1_representable(qw)
    if lin.bias is not None:
        qw.bias = lin.bias.detach().clone()
    lin.weight.data.copy_(qw.dequantize(lin.weight.dtype))
    return qw


def _rows(qw: F.QuantizedWeight, start: int, stop: int) -> F.QuantizedWeight:
    """Output rows ``start:stop`` of an integer quantized weight (its own linear's share; every tensor its
    own copy: a checkpoint cannot hold tensors that share memory)."""
    return dataclasses.replace(
        qw, qweight=qw.qweight[start:stop].clone(), scales=qw.scales[start:stop].clone(),
        zeros=qw.zeros[start:stop].clone(), g_idx=qw.g_idx.clone(),
    )  # fmt: skip


def _rtn_like(model, targets, opts, progress) -> dict[str, F.QuantizedWeight]:
    out = {}
    for name, lin in targets.items():
        if opts.method == "fp8":
            qw = fp8_quantize(lin.weight)
        elif opts.method in bnb.KINDS:
            qw = bnb.bnb_quantize(lin.weight, bnb.KINDS[opts.method])
        else:
            qw = rtn_quantize(lin.weight, bits=opts.bits, group_size=opts.group_size, sym=opts.sym)
        out[name] = _store(lin, qw, opts.fmt)
        progress()
    return out


def _shared_hessians(acc: dict) -> tuple[Callable[[str, torch.Tensor], None], dict[str, str]]:
    """A ``collect`` callback that adds each input to its module's Hessian once per tensor: modules fed
    the very same tensor in a row (q/k/v, gate/up) are recorded in ``alias`` (name -> the module whose
    accumulator took it) instead of repeating the ``XᵀX`` product. The layer's forward is deterministic,
    so a module aliased in one batch is aliased in every batch."""
    last: list = [None, None]
    alias: dict[str, str] = {}

    def add(name: str, x: torch.Tensor) -> None:
        if x is last[0]:
            alias[name] = alias.get(last[1], last[1])
            return
        acc[name].add(x)
        last[0], last[1] = x, name

    return add, alias


# A true-sequential GPTQ layer is quantized in one forward when the whole calibration set fits one batch
# within this many bytes of activations (see _fits_one_batch); larger sets use --batch-size batches.
ONE_BATCH_BYTES = 1 << 30


def _fits_one_batch(model, ids: torch.Tensor) -> bool:
    """Whether one forward of a decoder layer over every calibration token at once stays within
    ``ONE_BATCH_BYTES``: float32 activations estimated as each linear's output, twice over (the norms,
    residuals, rotary and activation-function temporaries around them). SmolLM2-135M: 41 KiB a token,
    so 32 x 512 tokens take ~0.7 GB; the 128 x 2048 default needs batches."""
    per_token = 2 * 4 * sum(m.out_features for m in linears_of(decoder_layers(model)[0]).values())
    return ids.numel() * per_token <= ONE_BATCH_BYTES


def _gptq(model, targets, opts, ids, progress, warn) -> dict[str, F.QuantizedWeight]:
    """GPTQ layer by layer. Three schedules, one result:

    * true-sequential, calibration set in one batch (the default whenever it fits ``ONE_BATCH_BYTES``):
      one forward per layer; each linear is quantized from a forward pre-hook, on its full calibration
      input, just before it runs, so every linear sees inputs from the already-quantized linears before
      it and the forward's output is the quantized layer's output (the input of the next layer);
    * true-sequential in batches (the reference): for each set of ``SEQUENTIAL`` a forward that stops
      at the set's inputs, then the set is quantized; then one more forward for the layer's output;
    * ``--no-true-sequential`` (llm-compressor's and the GPTQ reference's default): one forward collects
      every linear's input from the floating-point layer, then all are quantized, then the output forward.

    Linears fed the very same tensor (q/k/v, gate/up) share one Hessian and one factorisation."""
    from llmctl.core.quantize.gptq import HessianAccumulator, gptq_quantize, hessian_factor

    layers = decoder_layers(model)
    prefix = next(name for name, m in model.named_modules() if m is layers)
    out: dict[str, F.QuantizedWeight] = {}
    one_batch = opts.true_sequential and _fits_one_batch(model, ids)

    def quantize(index: int, names: list[str], own: dict[str, nn.Linear], factor) -> None:
        """GPTQ on linears that share one Hessian factor, as one weight of their stacked rows: rows are
        quantized independently, so this is each linear's own result, in one column loop instead of one
        per linear."""
        fulls = [f"{prefix}.{index}.{n}" for n in names]
        W = torch.cat([own[n].weight.detach() for n in names]) if len(names) > 1 else own[names[0]].weight
        qw = gptq_quantize(
            W, None, bits=opts.bits, group_size=opts.group_size, sym=opts.sym, act_order=opts.act_order,
            static_groups=opts.static_groups, damp=opts.damp, name=fulls[0], factor=factor,
        )  # fmt: skip
        start = 0
        for n, full in zip(names, fulls, strict=True):
            stop = start + own[n].out_features
            out[full] = _store(own[n], _rows(qw, start, stop) if len(names) > 1 else qw, opts.fmt)
            start = stop

    def factor_of(x_or_acc, full: str):
        acc = x_or_acc
        if isinstance(x_or_acc, torch.Tensor):
            acc = HessianAccumulator(x_or_acc.shape[-1])
            acc.add(x_or_acc)
        return hessian_factor(acc.H, act_order=opts.act_order, damp=opts.damp, warn=warn, name=full)

    def own_linears(index: int) -> dict[str, nn.Linear]:
        return {
            n[len(f"{prefix}.{index}.") :]: m
            for n, m in targets.items()
            if n.startswith(f"{prefix}.{index}.")
        }

    def on_layer_one_forward(index: int, layer: nn.Module, inputs: LayerInputs) -> list[torch.Tensor]:
        own = own_linears(index)
        done: dict[str, torch.Tensor] = {}  # linear -> the input it was quantized for
        originals: dict[str, torch.Tensor] = {}  # weights of linears quantized ahead of their own call

        def quantize_before_run(n: str, x: torch.Tensor) -> None:
            if n in done:
                if done[n] is x or n not in originals:
                    return
                own[n].weight.data.copy_(originals.pop(n))  # it was fed another tensor after all: redo it
            # the rest of n's true-sequential set is fed the same tensor in Llama-like layers (q/k/v,
            # gate/up): quantize them with n now, and check the guess when each of them is called
            peers = [
                m for s in SEQUENTIAL if n in s for m in s
                if m != n and m in own and m not in done and own[m].in_features == own[n].in_features
            ]  # fmt: skip
            for m in peers:
                originals[m] = own[m].weight.detach().clone()
            quantize(index, [n, *peers], own, factor_of(x, f"{prefix}.{index}.{n}"))
            for m in (n, *peers):
                done[m] = x

        outputs = inputs.forward_with_pre_hooks(layer, own, quantize_before_run)
        progress()
        return outputs

    def on_layer(index: int, layer: nn.Module, inputs: LayerInputs) -> None:
        own = own_linears(index)
        sets = [[n for n in s if n in own] for s in SEQUENTIAL] if opts.true_sequential else []
        rest = [n for n in own if not any(n in s for s in sets)]
        sets = [s for s in sets if s] + ([rest] if rest else [])
        for names in sets:
            acc = {n: HessianAccumulator(own[n].in_features) for n in names}
            add, alias = _shared_hessians(acc)
            inputs.collect(layer, {n: own[n] for n in names}, add)
            for owner in [n for n in names if n not in alias]:
                group = [owner] + [n for n in names if alias.get(n) == owner]
                quantize(index, group, own, factor_of(acc[owner], f"{prefix}.{index}.{owner}"))
        progress()

    batch_size = ids.shape[0] if one_batch else opts.batch_size
    run_layerwise(model, ids, on_layer_one_forward if one_batch else on_layer, batch_size=batch_size)
    return out


def _awq(model, targets, opts, ids, progress) -> dict[str, F.QuantizedWeight]:
    from llmctl.core.quantize.awq import awq_layer, awq_quantize

    layers = decoder_layers(model)
    prefix = next(name for name, m in model.named_modules() if m is layers)
    out: dict[str, F.QuantizedWeight] = {}

    def on_layer(index: int, layer: nn.Module, inputs: LayerInputs) -> None:
        awq_layer(layer, inputs, bits=opts.bits, group_size=opts.group_size)
        for n, lin in linears_of(layer, opts.skip).items():
            full = f"{prefix}.{index}.{n}"
            if full in targets:
                qw = awq_quantize(lin.weight, bits=opts.bits, group_size=opts.group_size)
                out[full] = _store(lin, qw, opts.fmt)
        progress()

    run_layerwise(model, ids, on_layer, batch_size=opts.batch_size)
    return out


@torch.no_grad()
def quantize_loaded(model, tokenizer, opts: QuantizeOptions, *, warn=None, progress=None):
    """Quantize ``model`` in place (its linears hold the dequantized weights afterwards); returns the
    :class:`QuantizedWeight` of every quantized linear by module name."""
    opts = opts.resolved()
    warn = warn or (lambda message: None)
    progress = progress or (lambda: None)
    targets = _quantizable(model, opts)
    if opts.method == "awq":
        from llmctl.core.quantize.awq import llama_groups

        llama_groups(decoder_layers(model)[0])  # an unsupported architecture fails before calibration
    if not METHODS[opts.method].calibrated:
        return _rtn_like(model, targets, opts, progress)
    ids = calibration_ids(tokenizer, opts.calib)
    if opts.method == "gptq":
        return _gptq(model, targets, opts, ids, progress, warn)
    return _awq(model, targets, opts, ids, progress)


def quantized_state_dict(model, quantized: dict[str, F.QuantizedWeight], fmt: str) -> dict[str, torch.Tensor]:
    """Every tensor of the output checkpoint: the model's own tensors (minus quantized weights and a tied
    ``lm_head``) plus each quantized layer's tensors in ``fmt``."""
    writer = bnb.BnbWeight.checkpoint_tensors if fmt == BNB_FORMAT else F.WRITERS[fmt]
    state = {}
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, tensor in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if module in quantized or (tied and name == "lm_head.weight"):
            continue
        state[name] = tensor.detach().contiguous()
    for module, qw in quantized.items():
        for suffix, tensor in writer(qw).items():
            state[f"{module}.{suffix}"] = tensor.contiguous()
    return state


def write_quantized(
    model, tokenizer, quantized, opts: QuantizeOptions, directory: Path, source: Path
) -> None:
    from safetensors.torch import save_file

    from llmctl import __version__

    opts = opts.resolved()
    directory = Path(directory)
    kind = "fp8" if opts.method == "fp8" else "int"
    ignore = ["lm_head"] + sorted(
        name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in quantized
        and name != "lm_head"
    )  # fmt: skip
    if opts.fmt == BNB_FORMAT:
        qc = bnb.quantization_config(bnb.KINDS[opts.method], skip_modules=ignore if len(ignore) > 1 else None)
    else:
        qc = F.quantization_config(
            opts.fmt, bits=opts.bits, group_size=opts.group_size, sym=opts.sym, act_order=opts.act_order,
            damp=opts.damp, static_groups=opts.static_groups, true_sequential=opts.true_sequential,
            kind=kind, ignore=ignore, method=opts.method, version=__version__,
        )  # fmt: skip
    save_file(quantized_state_dict(model, quantized, opts.fmt), str(directory / "model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    config = model.config.to_dict()
    config["quantization_config"] = qc
    config.pop("_name_or_path", None)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if opts.fmt == "gptq":
        (directory / "quantize_config.json").write_text(json.dumps(qc, indent=2) + "\n")
    copied = False
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, directory / name)
            copied = True
    if not copied and tokenizer is not None:
        tokenizer.save_pretrained(str(directory))


def quantize_model(model_path: str, output: Path, opts: QuantizeOptions, *, force: bool = False,
                   warn=None, progress=None, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """The whole command: load, quantize, write ``output`` atomically (with ``llmctl.json``)."""
    from llmctl.core.io import atomic_output
    from llmctl.core.models.hf import load_model, load_tokenizer, resolve_model
    from llmctl.core.provenance import now, write_provenance

    resolved = opts.resolved()
    started = now()
    ref = resolve_model(model_path)
    torch.manual_seed(seed)
    model = load_model(ref, device="cpu", dtype="float32")
    tokenizer = load_tokenizer(ref)
    t0 = time.perf_counter()
    quantized = quantize_loaded(model, tokenizer, resolved, warn=warn, progress=progress)
    seconds = time.perf_counter() - t0
    source = ref.path if ref.kind == "hf" else ref.path.parent
    with atomic_output(output, force=force) as tmp:
        write_quantized(model, tokenizer, quantized, resolved, tmp, source)
        size = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        summary = {
            "output": str(output), "method": resolved.method, "format": resolved.fmt, "bits": resolved.bits,
            "group_size": resolved.group_size, "sym": resolved.sym, "act_order": resolved.act_order,
            "layers_quantized": len(quantized), "quantize_seconds": round(seconds, 3),
            "size_bytes": size,
        }  # fmt: skip
        if METHODS[resolved.method].calibrated:
            c = resolved.calib
            summary["calibration"] = {
                "samples": c.samples,
                "seq_len": c.seq_len,
                "file": c.path and str(c.path),
            }
        inputs = [model_path] + ([resolved.calib.path] if resolved.calib.path else [])
        write_provenance(tmp, command="quantize", inputs=inputs, started_at=started, seed=seed,
                         extra={"summary": summary})  # fmt: skip
    return summary
