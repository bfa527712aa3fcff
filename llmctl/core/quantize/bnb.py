"""bitsandbytes NF4 and int8 export, in the layout transformers writes when it saves a model loaded with
``BitsAndBytesConfig`` (so ``from_pretrained`` loads it back with bitsandbytes, on CPU or CUDA).

The quantization itself is bitsandbytes' own (``quantize_4bit`` / ``int8_vectorwise_quant``, which run on
the CPU since 0.45), so the tensors are byte-identical to what transformers + bitsandbytes produce:

* **NF4** (``load_in_4bit``, ``bnb_4bit_quant_type="nf4"``, double quant): ``{m}.weight`` uint8
  ``[N*K/2, 1]`` (two 4-bit codes a byte, blocks of 64 along the flattened weight), ``weight.absmax``
  (uint8: the block absmax quantized again in blocks of 256), ``weight.quant_map`` fp32 ``[16]`` (the NF4
  code), ``weight.nested_absmax``, ``weight.nested_quant_map`` fp32 ``[256]`` and
  ``weight.quant_state.bitsandbytes__nf4`` (uint8 bytes of a JSON dict: quant_type, blocksize, dtype,
  shape, nested_blocksize, nested_dtype, nested_offset).
* **int8** (``load_in_8bit``, LLM.int8()): ``{m}.weight`` int8 ``[N, K]`` (row-wise absmax of the fp16
  weight -> round(127 * w / absmax)), ``{m}.SCB`` fp32 ``[N]`` (the row absmax) and ``{m}.weight_format``
  uint8 scalar 0 (row-major).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmctl.core.errors import UsageError

NF4_BLOCKSIZE = 64  # transformers' Params4bit default
KINDS = {"bnb-nf4": "nf4", "bnb-int8": "int8"}


@dataclass
class BnbWeight:
    """One linear's bitsandbytes tensors (names relative to the module) and its dequantized weight."""

    tensors: dict[str, torch.Tensor]
    dequantized: torch.Tensor
    bits: int
    bias: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantized.to(dtype)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """What the checkpoint stores for this module (the bias stays in full precision)."""
        return self.tensors if self.bias is None else {**self.tensors, "bias": self.bias}


def _functional():
    try:
        import bitsandbytes.functional as bf
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise UsageError(
            "--method bnb-nf4/bnb-int8 needs the bitsandbytes package (pip install 'bitsandbytes>=0.45')"
        ) from e
    return bf


@torch.no_grad()
def bnb_quantize(weight: torch.Tensor, kind: str) -> BnbWeight:
    """``weight`` ``[N, K]`` -> the tensors transformers saves for a bitsandbytes ``kind`` ("nf4"/"int8")."""
    bf = _functional()
    w = weight.detach().float().contiguous().cpu()
    if kind == "nf4":
        packed, state = bf.quantize_4bit(
            w, blocksize=NF4_BLOCKSIZE, compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8
        )
        tensors = {"weight": packed}
        tensors.update({f"weight.{k}": v for k, v in state.as_dict(packed=True).items()})
        return BnbWeight(tensors, bf.dequantize_4bit(packed, state).float(), 4)
    if kind == "int8":
        # transformers' Int8Params quantizes the fp16 weight (bitsandbytes' int8 path is fp16)
        cb, scb, _ = bf.int8_vectorwise_quant(w.half())
        tensors = {"weight": cb, "SCB": scb, "weight_format": torch.tensor(0, dtype=torch.uint8)}
        return BnbWeight(tensors, cb.float() * scb[:, None] / 127.0, 8)
    raise UsageError(f"unknown bitsandbytes kind {kind!r}; choose nf4 or int8")


def quantization_config(kind: str, *, skip_modules: list[str] | None = None) -> dict:
    """``quantization_config`` as transformers' ``BitsAndBytesConfig.to_dict()`` writes it."""
    nf4 = kind == "nf4"
    return {
        "_load_in_4bit": nf4, "_load_in_8bit": not nf4, "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4" if nf4 else "fp4",
        "bnb_4bit_use_double_quant": nf4, "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": skip_modules or None,
        "llm_int8_threshold": 6.0, "load_in_4bit": nf4, "load_in_8bit": not nf4,
        "quant_method": "bitsandbytes",
    }  # fmt: skip
