"""Running quantized checkpoints: :class:`QuantLinear` and :func:`load_quantized`.

``load_quantized(dir)`` reads any of the three formats llmctl writes (GPTQ v1, AWQ GEMM,
compressed-tensors pack-/float-quantized) into an ordinary transformers model whose quantized linears are
:class:`QuantLinear` modules. A ``QuantLinear`` keeps the integers and dequantizes them on the fly in each
forward (the reference path, any device); a W4A16 kernel can replace that forward without changing the
stored buffers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmctl.core.errors import ModelError
from llmctl.core.models.hf import quant_method, read_safetensors
from llmctl.core.quantize import formats as F


class QuantLinear(nn.Module):
    """A linear layer holding a :class:`~llmctl.core.quantize.formats.QuantizedWeight`."""

    def __init__(self, qw: F.QuantizedWeight, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.out_features, self.in_features = qw.shape
        self.bits, self.group_size, self.kind, self.sym = qw.bits, qw.group_size, qw.kind, qw.sym
        self.dtype = dtype
        # [N, K] uint8; fp8 bytes are kept as uint8 too, so that ``model.to(dtype)`` leaves them alone
        qweight = qw.qweight.view(torch.uint8) if qw.kind == "fp8" else qw.qweight
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("scales", qw.scales, persistent=False)  # [N, G]
        self.register_buffer("zeros", qw.zeros, persistent=False)  # [N, G] or None
        self.register_buffer("g_idx", qw.g_idx, persistent=False)  # [K] or None
        self.register_buffer("bias", None if qw.bias is None else qw.bias.to(dtype), persistent=False)

    def quantized_weight(self) -> F.QuantizedWeight:
        return F.QuantizedWeight(
            qweight=self.qweight.view(torch.float8_e4m3fn) if self.kind == "fp8" else self.qweight,
            scales=self.scales, zeros=self.zeros, g_idx=self.g_idx, bits=self.bits,
            group_size=self.group_size, sym=self.sym, bias=self.bias, kind=self.kind,
        )  # fmt: skip

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight ``[N, K]`` (computed on each access)."""
        if self.kind == "int" and self._natural_groups():
            # fast path of the same formula: columns in natural group order, so the per-group scales and
            # zeros broadcast over [N, G, group] instead of being gathered per column (~10x less work)
            n, k = self.qweight.shape
            g = self.scales.shape[1]
            q = self.qweight.view(n, g, k // g).to(torch.float32)
            w = (q - self.zeros.to(torch.float32)[:, :, None]) * self.scales.to(torch.float32)[:, :, None]
            return w.view(n, k).to(self.dtype)
        return self.quantized_weight().dequantize(self.dtype)

    def _natural_groups(self) -> bool:
        if getattr(self, "_natural", None) is None:
            k, g = self.in_features, self.scales.shape[1]
            self._natural = k % g == 0 and torch.equal(
                self.g_idx.cpu().long(), torch.arange(k) // (k // g)
            )  # fmt: skip
        return self._natural

    def cache_weight(self) -> None:
        """Keep the dequantized weight (fp memory, dense matmul speed): llmctl's engine does this on the CPU,
        where dequantizing every weight at every decode step costs ~100x the matmul itself."""
        self.register_buffer("dense", self.weight, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = getattr(self, "dense", None)
        w = dense if dense is not None else self.weight
        return nn.functional.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, {self.kind}{self.bits}, group={self.group_size}"
        )


def read_quantization_config(directory: Path) -> dict:
    try:
        config = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {directory}/config.json: {e}") from e
    qc = config.get("quantization_config")
    if not qc:
        raise ModelError(f"{directory} is not a quantized model (config.json has no quantization_config)")
    return qc


def format_of(qc: dict) -> str:
    method = qc.get("quant_method")
    if method in ("gptq", "awq", "compressed-tensors"):
        return method
    raise ModelError(
        f"unsupported quantization method {method!r} (llmctl reads gptq, awq, compressed-tensors)"
    )


def kernel_linear(qw: F.QuantizedWeight, dtype: torch.dtype = torch.float32) -> nn.Module | None:
    """A ``llmctl.kernels.w4a16.W4A16Linear`` (Triton W4A16 kernel on CUDA, its torch reference
    elsewhere) holding ``qw`` in GPTQ v2 buffers (zeros stored as they are), or None when the kernel
    module is absent or cannot hold this weight (fp8, shapes it does not pack)."""
    if qw.kind != "int":
        return None
    try:
        from llmctl.kernels.w4a16 import W4A16Linear, pack_gptq
    except ImportError:
        return None
    n, k = qw.shape
    try:
        module = W4A16Linear(
            k, n, bias=qw.bias is not None, bits=qw.bits, group_size=qw.group_size, zero_offset=0, dtype=dtype
        )
        qweight, qzeros, scales, g_idx = pack_gptq(
            qw.qweight.T.to(torch.int32), qw.zeros.T.to(torch.int32), qw.scales.T, qw.g_idx,
            bits=qw.bits, group_size=qw.group_size, v1=False,
        )  # fmt: skip
    except ValueError:
        return None
    module.qweight.copy_(qweight)
    module.qzeros.copy_(qzeros)
    module.scales.copy_(qw.scales.T.to(dtype))  # the fp32 scales as they are (pack_gptq rounds to fp16)
    module.g_idx.copy_(g_idx)
    if qw.bias is not None:
        module.bias.copy_(qw.bias.to(dtype))
    return module


@dataclass
class QuantizedCheckpoint:
    """A quantized directory read once: every quantized linear as a :class:`QuantizedWeight` (by module
    name) and the remaining plain tensors (embeddings, norms, unquantized linears) as a state dict. Both
    transformers models (:func:`load_quantized`) and llmctl's engine (``load_decoder``) are built from it."""

    directory: Path
    config: dict  # quantization_config
    fmt: str
    layers: dict[str, F.QuantizedWeight]
    state: dict[str, torch.Tensor]

    def install(
        self, model: nn.Module, dtype: torch.dtype = torch.float32, *, kernel: bool = True, device=None
    ):
        """Replace ``model``'s quantized linears (same module names) by ``W4A16Linear`` (when ``kernel``
        and the kernel module holds the weight) or :class:`QuantLinear`. Returns the new modules'
        persistent tensors by full name, so a ``load_state_dict(..., assign=True)`` that includes them
        sees neither missing nor unexpected keys. With a non-CUDA ``device`` (llmctl's engine on the CPU) the
        modules are QuantLinear with the dequantized weight cached (see :meth:`QuantLinear.cache_weight`)."""
        on_cpu = device is not None and torch.device(device).type != "cuda"
        tensors: dict[str, torch.Tensor] = {}
        for name, qw in self.layers.items():
            try:
                model.get_submodule(name)
            except AttributeError as e:
                raise ModelError(f"{self.directory}: quantized layer {name} is not in the model") from e
            module = (kernel_linear(qw, dtype) if kernel and not on_cpu else None) or QuantLinear(qw, dtype)
            if on_cpu:
                module.cache_weight()
            model.set_submodule(name, module)
            tensors.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        return tensors


def is_quantized_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory``'s config.json declares a format :func:`read_quantized` reads."""
    return quant_method(Path(directory)) in ("gptq", "awq", "compressed-tensors")


def read_quantized(directory: str | Path) -> QuantizedCheckpoint:
    """The quantized tensors of a GPTQ/AWQ/compressed-tensors directory, decoded into
    :class:`QuantizedWeight` per layer, plus every other tensor as it is stored."""
    directory = Path(directory)
    qc = read_quantization_config(directory)
    fmt = format_of(qc)
    tensors = read_safetensors(directory)
    markers = F.layer_tensor_names(fmt, qc)
    quantized = sorted({name.rsplit(".", 1)[0] for name in tensors if name.rsplit(".", 1)[-1] in markers})
    if fmt == "compressed-tensors" and qc.get("format") == "float-quantized":
        quantized = sorted(
            name.rsplit(".", 1)[0] for name, t in tensors.items()
            if name.endswith(".weight") and t.dtype == torch.float8_e4m3fn
        )  # fmt: skip
    layers: dict[str, F.QuantizedWeight] = {}
    for module_name in quantized:
        prefix = module_name + "."
        own = {k[len(prefix) :]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}
        try:
            layers[module_name] = F.read_layer(fmt, qc, own)
        except KeyError as e:
            raise ModelError(f"{directory}: quantized layer {module_name} lacks tensor {e}") from e
    return QuantizedCheckpoint(directory, qc, fmt, layers, tensors)


@torch.no_grad()
def load_quantized(
    directory: str | Path, *, dtype: torch.dtype = torch.float32, kernel: bool = True, device=None
):
    """A transformers causal LM from a quantized llmctl (or GPTQ/AWQ/compressed-tensors) directory, in
    eval mode on the CPU. Integer linears become ``W4A16Linear`` (the Triton W4A16 kernel's module) when
    ``kernel`` and the kernel module can hold them, else the reference :class:`QuantLinear`. A non-CUDA
    ``device`` (the model will run on the CPU) gets QuantLinears with their dequantized weights cached, as
    llmctl's engine does: dequantizing in every forward costs far more than the matmul there."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    checkpoint = read_quantized(directory)
    config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    checkpoint.install(model, dtype, kernel=kernel, device=device)
    tensors = checkpoint.state
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected:
        raise ModelError(f"{directory}: unexpected tensors {unexpected[:3]}")
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    replaced = set(checkpoint.layers)  # their buffers were filled by install()
    missing = [m for m in missing if m not in tied and m.rsplit(".", 1)[0] not in replaced]
    if missing:
        raise ModelError(f"{directory}: missing tensors {missing[:3]}")
    if tied:
        model.tie_weights()
    model.eval()
    return model
