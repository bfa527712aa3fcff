"""On-disk layouts of quantized linear layers: the single authority for packing, unpacking and configs.

Every method produces a :class:`QuantizedWeight` (integers plus per-group scales and zero points, in the
``nn.Linear`` orientation ``[out_features N, in_features K]``); the writers below turn it into one of the
formats other tools load, and the readers turn those tensors back into a :class:`QuantizedWeight`.

Layouts (checked against the anchors' sources: AutoGPTQ/GPTQModel ``pack``, GPTQModel ``AWQ_ORDER``,
AutoAWQ ``WQLinear_GEMM.from_linear``, compressed-tensors ``pack_to_int32``):

* **GPTQ v1** (AutoGPTQ, GPTQModel ``checkpoint_format="gptq"``, transformers/optimum):
  ``qweight`` int32 ``[K*bits/32, N]``, the transposed integers packed densely along K (value ``i`` of a
  column at bit ``i*bits``, so 3-bit values straddle words); ``qzeros`` int32 ``[G, N*bits/32]`` packed
  the same way along N, storing ``zero - 1`` (the v1 offset); ``scales`` fp16 ``[G, N]``; ``g_idx`` int32
  ``[K]`` (input column -> group). Dequantized weight ``W[n, k] = scales[g, n] * (q[k, n] - zero[g, n])``
  with ``g = g_idx[k]``.
* **AWQ GEMM** (AutoAWQ ``version="gemm"``): ``qweight`` int32 ``[K, N/8]`` packed along N, slot ``i`` of
  each word holding output column ``8*j + AWQ_ORDER[i]``; ``qzeros`` int32 ``[G, N/8]`` the same way,
  without the v1 offset; ``scales`` fp16 ``[G, N]``. 4-bit only, no ``g_idx``.
* **compressed-tensors pack-quantized** (llm-compressor, vLLM): ``weight_packed`` int32 ``[N, K*bits/32]``,
  the signed integers ``q - 2**(bits-1)`` shifted back to unsigned and packed densely along K;
  ``weight_scale`` ``[N, G]``; ``weight_zero_point`` (asymmetric only) int32 ``[N*bits/32, G]``, the zero
  points packed the same way along dim 0; ``weight_shape`` int64 ``[2]``.
* **compressed-tensors float-quantized** (FP8 e4m3, per output channel): ``weight`` float8_e4m3fn
  ``[N, K]`` and ``weight_scale`` ``[N, 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmctl.core.errors import ModelError, UsageError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ: slot i of a packed word holds column AWQ_ORDER[i]
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FORMATS = ("gptq", "awq", "compressed-tensors")


@dataclass
class QuantizedWeight:
    """One linear layer's quantized weight, format-free.

    ``W_hat[n, k] = scales[n, g_idx[k]] * (qweight[n, k] - zeros[n, g_idx[k]])`` for integer formats;
    for ``fp8`` ``qweight`` holds float8 values and ``W_hat = qweight.float() * scales`` (``scales [N, 1]``).
    """

    qweight: torch.Tensor  # [N, K] uint8 integers in [0, 2**bits - 1] (or float8_e4m3fn for fp8)
    scales: torch.Tensor  # [N, G] float32
    zeros: torch.Tensor | None  # [N, G] int32 zero points in [0, 2**bits - 1]; None for fp8
    g_idx: torch.Tensor | None  # [K] int32 group of each input column; None for fp8
    bits: int
    group_size: int  # -1: one group per row
    sym: bool
    bias: torch.Tensor | None = None
    kind: str = "int"  # "int" or "fp8"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The reference dequantization, ``[N, K]``: what every runtime path must reproduce."""
        if self.kind == "fp8":
            return (self.qweight.to(torch.float32) * self.scales.to(torch.float32)).to(dtype)
        g = self.g_idx.long()
        scale = self.scales.to(torch.float32)[:, g]  # [N, K]
        zero = self.zeros.to(torch.float32)[:, g]
        return (scale * (self.qweight.to(torch.float32) - zero)).to(dtype)


def natural_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """Group of each input column without act-order: ``k // group_size`` (all zeros for ``-1``)."""
    size = in_features if group_size == -1 else group_size
    return (torch.arange(in_features) // size).to(torch.int32)


# --- dense bit packing (the one packer every integer format uses) ------------------------------------


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit integers densely along dim 0 into int32: ``[R, C] -> [R*bits/32, C]``.

    Value ``r`` of a column sits at bit ``r*bits`` of the packed column (little-endian bit order), which
    is AutoGPTQ's layout for 2/4/8 bits and its 3-bit "10 + 1/2 + 10 + 2/1 + 10" layout alike. Values are
    taken modulo ``2**bits`` (GPTQ v1 stores zero - 1, which wraps for a zero of 0, as AutoGPTQ's does).
    The bit packing itself is the W4A16 kernel module's, so the files and the kernel agree by construction.
    """
    from llmctl.kernels.w4a16 import pack_int

    rows = values.shape[0]
    if (rows * bits) % 32:
        raise UsageError(f"cannot pack {rows} {bits}-bit values into whole int32 words")
    return pack_int(values.to(torch.int64) & ((1 << bits) - 1), bits, 0)


def unpack_rows(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: ``[rows*bits/32, C]`` int32 -> ``[rows, C]`` int32 in [0, 2**bits)."""
    from llmctl.kernels.w4a16 import unpack_int

    return unpack_int(packed, bits, 0)[:rows]


# --- GPTQ v1 -----------------------------------------------------------------------------------------


def to_gptq(w: QuantizedWeight) -> dict[str, torch.Tensor]:
    """GPTQ v1 tensors of one layer (names without the module prefix)."""
    _require_int(w, "gptq")
    n, k = w.shape
    if (n * w.bits) % 32:
        raise UsageError(f"gptq format needs out_features*bits divisible by 32 (got {n}x{w.bits})")
    out = {
        "qweight": pack_rows(w.qweight.T.to(torch.int32), w.bits),  # [K*bits/32, N]
        "qzeros": pack_rows((w.zeros.to(torch.int32) - 1), w.bits).T.contiguous(),  # [G, N*bits/32]
        "scales": w.scales.T.to(torch.float16).contiguous(),  # [G, N]
        "g_idx": w.g_idx.to(torch.int32).contiguous(),
    }
    if w.bias is not None:
        out["bias"] = w.bias.to(torch.float16)
    return out


def v1_representable(w: QuantizedWeight) -> int:
    """GPTQ v1 stores ``zero - 1``, so a zero point of 0 reads back as ``2**bits`` in AutoGPTQ and
    transformers. Move such groups' zero to 1 (their integers up by one step, the top one clamped), in
    place; returns how many (row, group) pairs changed."""
    if w.kind != "int":
        return 0
    bad = w.zeros == 0  # [N, G]
    count = int(bad.sum())
    if count:
        cols = bad[:, w.g_idx.long()]  # [N, K]: columns whose group moves
        q = w.qweight.to(torch.int32)
        w.qweight = torch.where(cols, (q + 1).clamp(max=2**w.bits - 1), q).to(torch.uint8)
        w.zeros = torch.where(bad, 1, w.zeros).to(torch.int32)
    return count


def from_gptq(t: dict[str, torch.Tensor], *, bits: int, group_size: int, sym: bool) -> QuantizedWeight:
    """Read GPTQ v1 tensors back. ``(stored + 1) & mask`` undoes the v1 zero offset, including the
    asymmetric zero point 0 that v1 stores as ``-1``."""
    qweight, scales = t["qweight"], t["scales"]
    k = qweight.shape[0] * 32 // bits
    n = qweight.shape[1]
    mask = (1 << bits) - 1
    q = unpack_rows(qweight, bits, k).T.to(torch.uint8)  # [N, K]
    zeros = (unpack_rows(t["qzeros"].T.contiguous(), bits, n) + 1) & mask  # [N, G]
    g_idx = t.get("g_idx")
    if g_idx is None:
        g_idx = natural_g_idx(k, group_size)
    return QuantizedWeight(
        qweight=q, scales=scales.T.to(torch.float32).contiguous(), zeros=zeros.to(torch.int32),
        g_idx=g_idx.to(torch.int32), bits=bits, group_size=group_size, sym=sym, bias=t.get("bias"),
    )  # fmt: skip


# --- AWQ GEMM ----------------------------------------------------------------------------------------


def _awq_columns(n: int) -> torch.Tensor:
    """The column stored in each packing position: position ``8j+i`` holds column ``8j+AWQ_ORDER[i]``."""
    order = torch.tensor(AWQ_ORDER)
    return (torch.arange(n // 8)[:, None] * 8 + order[None, :]).reshape(-1)


def to_awq(w: QuantizedWeight) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM tensors of one layer."""
    _require_int(w, "awq")
    n, k = w.shape
    if w.bits != 4:
        raise UsageError("awq format stores 4-bit weights only; use --format gptq for other bit widths")
    if not torch.equal(w.g_idx, natural_g_idx(k, w.group_size)):
        raise UsageError("awq format has no g_idx: act-order needs --format gptq")
    if n % 8:
        raise UsageError(f"awq format needs out_features divisible by 8 (got {n})")
    cols = _awq_columns(n)
    out = {
        # [K, N] integers, columns reordered, then 8 consecutive positions per word
        "qweight": pack_rows(w.qweight.T[:, cols].T.to(torch.int32), 4).T.contiguous(),  # [K, N/8]
        "qzeros": pack_rows(w.zeros.T[:, cols].T.to(torch.int32), 4).T.contiguous(),  # [G, N/8]
        "scales": w.scales.T.to(torch.float16).contiguous(),  # [G, N]
    }
    if w.bias is not None:
        out["bias"] = w.bias.to(torch.float16)
    return out


def from_awq(t: dict[str, torch.Tensor], *, group_size: int) -> QuantizedWeight:
    qweight = t["qweight"]
    k, n = qweight.shape[0], qweight.shape[1] * 8
    inverse = torch.argsort(_awq_columns(n))
    q = unpack_rows(qweight.T.contiguous(), 4, n)[inverse]  # [N, K]
    zeros = unpack_rows(t["qzeros"].T.contiguous(), 4, n)[inverse]  # [N, G]
    return QuantizedWeight(
        qweight=q.to(torch.uint8), scales=t["scales"].T.to(torch.float32).contiguous(), zeros=zeros,
        g_idx=natural_g_idx(k, group_size), bits=4, group_size=group_size, sym=False, bias=t.get("bias"),
    )  # fmt: skip


# --- compressed-tensors ------------------------------------------------------------------------------


def to_compressed_tensors(w: QuantizedWeight) -> dict[str, torch.Tensor]:
    """compressed-tensors tensors of one layer: ``pack-quantized`` for integers, ``float-quantized``
    for fp8."""
    n, k = w.shape
    if w.kind == "fp8":
        out = {"weight": w.qweight, "weight_scale": w.scales.to(torch.float32).reshape(n, 1)}
    else:
        if not torch.equal(w.g_idx, natural_g_idx(k, w.group_size)):
            raise UsageError("act-order (g_idx) is not written in compressed-tensors here; use --format gptq")
        # compressed-tensors holds signed integers (q - 2**(bits-1)) but packs them offset back to
        # unsigned, so the packed bits are exactly the unsigned q
        out = {
            "weight_packed": pack_rows(w.qweight.T.to(torch.int32), w.bits).T.contiguous(),  # [N, K*bits/32]
            "weight_scale": w.scales.to(torch.float32).contiguous(),  # [N, G]
            "weight_shape": torch.tensor([n, k], dtype=torch.int64),
        }
        if not w.sym:
            out["weight_zero_point"] = pack_rows(w.zeros.to(torch.int32), w.bits)  # [N*bits/32, G]
    if w.bias is not None:
        out["bias"] = w.bias
    return out


def from_compressed_tensors(t: dict[str, torch.Tensor], *, bits: int, group_size: int) -> QuantizedWeight:
    if "weight" in t and t["weight"].dtype == torch.float8_e4m3fn:
        n, k = t["weight"].shape
        return QuantizedWeight(
            qweight=t["weight"], scales=t["weight_scale"].to(torch.float32).reshape(n, 1), zeros=None,
            g_idx=None, bits=8, group_size=-1, sym=True, bias=t.get("bias"), kind="fp8",
        )  # fmt: skip
    n, k = (int(x) for x in t["weight_shape"])
    q = unpack_rows(t["weight_packed"].T.contiguous(), bits, k).T  # [N, K] unsigned
    g = t["weight_scale"].shape[1]
    if "weight_zero_point" in t:
        zeros = unpack_rows(t["weight_zero_point"], bits, n)  # [N, G] unsigned
        sym = False
    else:
        zeros = torch.full((n, g), 1 << (bits - 1), dtype=torch.int32)
        sym = True
    return QuantizedWeight(
        qweight=q.to(torch.uint8), scales=t["weight_scale"].to(torch.float32), zeros=zeros.to(torch.int32),
        g_idx=natural_g_idx(k, group_size), bits=bits, group_size=group_size, sym=sym, bias=t.get("bias"),
    )  # fmt: skip


# --- configs ------------------------------------------------------------------------------------------


def quantization_config(
    fmt: str, *, bits: int, group_size: int, sym: bool, act_order: bool = False, damp: float = 0.01,
    static_groups: bool = False, true_sequential: bool = True, kind: str = "int", ignore: list[str] = (),
    method: str = "gptq", version: str = "",
) -> dict:  # fmt: skip
    """The ``quantization_config`` block of ``config.json`` (also ``quantize_config.json`` for GPTQ)."""
    meta = {"quantizer": [f"llmctl:{version}"], "method": method}
    if fmt == "gptq":
        return {
            "quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order,
            "sym": sym, "static_groups": static_groups, "true_sequential": true_sequential,
            "damp_percent": damp, "checkpoint_format": "gptq", "lm_head": False, "meta": meta,
        }  # fmt: skip
    if fmt == "awq":
        return {
            "quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": not sym,
            "version": "gemm", "modules_to_not_convert": list(ignore) or None,
        }  # fmt: skip
    if fmt == "compressed-tensors":
        if kind == "fp8":
            weights = {
                "num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "group_size": None,
                "dynamic": False, "actorder": None, "observer": "minmax",
            }  # fmt: skip
            form = "float-quantized"
        else:
            weights = {
                "num_bits": bits, "type": "int", "symmetric": sym,
                "strategy": "channel" if group_size == -1 else "group",
                "group_size": None if group_size == -1 else group_size, "dynamic": False, "actorder": None,
                "observer": "minmax",
            }  # fmt: skip
            form = "pack-quantized"
        return {
            "quant_method": "compressed-tensors", "format": form, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": None, "output_activations": None,
                                          "format": form}},
            "ignore": list(ignore), "kv_cache_scheme": None,
        }  # fmt: skip
    raise UsageError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


WRITERS = {"gptq": to_gptq, "awq": to_awq, "compressed-tensors": to_compressed_tensors}


def layer_tensor_names(fmt: str, qc: dict) -> tuple[str, ...]:
    """The tensor suffixes that mark a module as quantized in ``fmt``."""
    if fmt in ("gptq", "awq"):
        return ("qweight",)
    return ("weight_packed",) if qc.get("format") == "pack-quantized" else ("weight_scale",)


def read_layer(fmt: str, qc: dict, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
    """One layer's tensors (names without the module prefix) -> :class:`QuantizedWeight`."""
    if fmt == "gptq":
        return from_gptq(tensors, bits=qc["bits"], group_size=qc["group_size"], sym=qc.get("sym", True))
    if fmt == "awq":
        return from_awq(tensors, group_size=qc["group_size"])
    if fmt == "compressed-tensors":
        weights = next(iter(qc["config_groups"].values()))["weights"]
        return from_compressed_tensors(
            tensors, bits=weights["num_bits"], group_size=weights["group_size"] or -1
        )
    raise ModelError(f"unsupported quantization format {fmt!r}")


def _require_int(w: QuantizedWeight, fmt: str) -> None:
    if w.kind != "int":
        raise UsageError(f"{fmt} format stores integer weights; fp8 is written as compressed-tensors")
