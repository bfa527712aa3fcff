"""llmctl's CPU kernels for the engine's decode step in float32 (x86-64 with AVX2/FMA), beside their torch
definitions.

Decoding one token per sequence is, on a CPU, a pass over every weight (bound by memory bandwidth) plus
thirty-odd small tensor ops per layer (bound by per-op overhead, about 5-10 µs each in eager torch). The
kernels in ``cpu_kernels.c`` address both:

- :func:`linear`: ``F.linear`` for up to 16 rows of ``x``. MKL's small-M products read the weights at
  15-16 GB/s on this project's 2-core AMD EPYC (and at 4-16 rows are 3-4x slower than at one row); the
  kernel streams each thread's block of weight rows once and reaches 20-22 GB/s, close to what a plain
  sum over the same bytes reaches (24 GB/s), at every row count up to 16. More rows go to ``F.linear``.
- :func:`rms_norm`: transformers' RMSNorm in one call instead of seven ops.
- :func:`decode_attention`: one decode step's attention (RoPE on the new query and key, the KV-cache
  write, masked softmax attention with GQA) in one call instead of about fifteen ops and SDPA.

Each has a torch reference here (``*_reference``); the tests hold the kernels to them.

The C source is compiled on first use with the system's C compiler (``$CC``, else ``cc``) into
``$LLMCTL_CACHE/kernels`` (default ``~/.cache/llmctl/kernels``), keyed by a hash of the source and flags,
and loaded with ctypes. Its OpenMP runtime is the ``libgomp.so.1`` torch has already loaded, so it runs
on torch's threads. Without AVX2/FMA (``torch.backends.cpu.get_cpu_capability()``), without a compiler, or
with ``LLMCTL_CPU_KERNELS=0``, :func:`available` is False and the engine runs its torch code.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MAX_ROWS = 16  # more rows than this (prefill, big batches) go to F.linear
SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
ENV = "LLMCTL_CPU_KERNELS"

# ctypes argument types of the C functions: p = pointer, i = int64, f = float
_CTYPES = {"p": ctypes.c_void_p, "i": ctypes.c_int64, "f": ctypes.c_float}
_SIGNATURES = {
    "llmctl_linear_f32": "p i i p i i p p",
    "llmctl_rms_norm_f32": "p i i i p f p i",
    "llmctl_decode_attention_f32": "p i i i i i p p p p i p p i i f p p",
}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cache_dir() -> Path:
    return Path(os.environ.get("LLMCTL_CACHE") or "~/.cache/llmctl").expanduser() / "kernels"


def _enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _supported() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64") or platform.system() != "Linux":
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def build(compiler: str | None = None) -> Path:
    """Compile ``cpu_kernels.c`` into the cache (once per source and flags); returns the library's path."""
    cc = compiler or os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise OSError(f"no C compiler {cc!r} on PATH")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *FLAGS]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # compile aside, then move into place
        out = Path(tmp) / target.name
        done = subprocess.run([cc, *FLAGS, "-o", str(out), str(SOURCE)], capture_output=True, text=True)
        if done.returncode != 0:
            raise OSError(f"{cc} failed on {SOURCE.name}: {done.stderr.strip()[-500:]}")
        os.replace(out, target)
    return target


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    with _lock:
        if not _tried:
            _tried = True
            if _supported():
                try:
                    lib = ctypes.CDLL(str(build()))
                    for name, args in _SIGNATURES.items():
                        fn = getattr(lib, name)
                        fn.restype = None
                        fn.argtypes = [_CTYPES[a] for a in args.split()]
                    _lib = lib
                except OSError as err:  # no compiler, or it failed: the torch definitions it is
                    log.warning("llmctl's CPU kernels are not available (%s); using torch", err)
        return _lib


def available() -> bool:
    """Whether the kernels are built and loaded (building them on the first call) and not switched off
    with ``LLMCTL_CPU_KERNELS=0``."""
    return _enabled() and _load() is not None


def can_run_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether :func:`linear` takes these inputs itself (else it hands them to ``F.linear``)."""
    k = x.shape[-1]
    return (
        x.dtype is torch.float32
        and weight.dtype is torch.float32
        and x.is_cpu
        and weight.is_contiguous()
        and weight.shape[1] == k
        and 0 < x.numel() <= MAX_ROWS * k
        and (bias is None or (bias.dtype is torch.float32 and bias.is_contiguous()))
        and not (torch.is_grad_enabled() and _needs_grad(x, weight, bias))
    )


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``x`` as rows of its last dimension: (a tensor holding them, row stride, row count), without a copy
    when the layout allows. The caller keeps the returned tensor alive while the kernel reads it."""
    k = x.shape[-1]
    if x.is_contiguous():
        return x, k, x.numel() // k
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows, rows.stride(0), rows.shape[0]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, by the C kernel for up to 16 rows of float32 on a CPU that has it."""
    lib = _lib if _tried else _load()
    if lib is None or not can_run_linear(x, weight, bias):
        return F.linear(x, weight, bias)
    n, k = weight.shape
    rows, ld, m = _rows(x)
    y = torch.empty((*x.shape[:-1], n), dtype=torch.float32)
    b = None if bias is None else bias.data_ptr()
    lib.llmctl_linear_f32(rows.data_ptr(), ld, m, weight.data_ptr(), n, k, b, y.data_ptr())
    return y


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: ``weight * (x * rsqrt(mean(x²) + eps))``, in float32."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`rms_norm_reference`, by the C kernel for float32 on a CPU that has it."""
    lib = _lib if _tried else _load()
    if (
        lib is None
        or x.dtype is not torch.float32
        or weight.dtype is not torch.float32
        or not x.is_cpu
        or not weight.is_contiguous()
        or x.numel() == 0
        or (torch.is_grad_enabled() and _needs_grad(x, weight))
    ):
        return rms_norm_reference(x, weight, eps)
    rows, ld, m = _rows(x)
    y = torch.empty(x.shape, dtype=torch.float32)
    lib.llmctl_rms_norm_f32(
        rows.data_ptr(), ld, m, x.shape[-1], weight.data_ptr(), eps, y.data_ptr(), x.shape[-1]
    )
    return y


def rope_signed(x: torch.Tensor, cos: torch.Tensor, nsin: torch.Tensor) -> torch.Tensor:
    """transformers' ``x * cos + rotate_half(x) * sin``, bit for bit, given ``nsin`` = sin with its first
    half negated: ``rotate_half(x) * sin == [x2, x1] * [-sin1, sin1]`` exactly (negating a factor only flips
    the product's sign bit). The sign is folded into sin once per forward instead of once per call."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * nsin


def decode_attention_reference(qkv, n_heads, n_kv_heads, cos, nsin, cache_k, cache_v, slots, mask, scale):
    """One decode step of attention for a batch, in torch: the definition :func:`decode_attention` keeps.

    ``qkv``: ``[B, 1, (H + 2 KV) * D]``, a fused q/k/v projection. ``cos``, ``nsin``: ``[B, 1, 1, D]``, the
    token's RoPE angles with sin's first half negated. ``cache_k``/``cache_v``: ``[B, KV, max_len, D]``;
    the rotated key and the value are written at ``slots`` (``[1]``). ``mask``: bool, ``[B, ..., kv_len]``
    whose first row per batch row says which cache slots the token attends to. Returns ``[B, 1, H * D]``.
    """
    b, d = qkv.shape[0], cache_k.shape[-1]
    qk = qkv[..., : (n_heads + n_kv_heads) * d].reshape(b, 1, n_heads + n_kv_heads, d)
    qk = rope_signed(qk, cos, nsin)
    q, k = qk[:, :, :n_heads].transpose(1, 2), qk[:, :, n_heads:].transpose(1, 2)
    v = qkv[..., (n_heads + n_kv_heads) * d :].reshape(b, 1, n_kv_heads, d).transpose(1, 2)
    cache_k[:, :, slots] = k
    cache_v[:, :, slots] = v
    kv_len = mask.shape[-1]
    groups = n_heads // n_kv_heads
    keys = cache_k[:, :, :kv_len].repeat_interleave(groups, dim=1)
    values = cache_v[:, :, :kv_len].repeat_interleave(groups, dim=1)
    attend = mask.reshape(b, -1, kv_len)[:, :1, None]  # [B, 1, 1, kv_len]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attend, scale=scale)
    return out.transpose(1, 2).reshape(b, 1, n_heads * d)


def decode_attention(qkv, n_heads, n_kv_heads, cos, nsin, cache_k, cache_v, slots, mask, scale):
    """:func:`decode_attention_reference`, by the C kernel for float32 on a CPU that has it."""
    lib = _lib if _tried else _load()
    b, d = qkv.shape[0], cache_k.shape[-1]
    if (
        lib is None
        or not qkv.is_cpu
        or not qkv.dtype == cos.dtype == nsin.dtype == cache_k.dtype == cache_v.dtype == torch.float32
        or not (qkv.is_contiguous() and cos.is_contiguous() and nsin.is_contiguous())
        or not (cache_k.is_contiguous() and cache_v.is_contiguous())
        or qkv.shape[1] != 1
        or d > 512
        or mask.dtype != torch.bool
        or mask.stride(-1) != 1
        or mask.shape[0] != b
        or slots.dtype != torch.int64
        or slots.numel() != 1
        or qkv.shape[-1] != (n_heads + 2 * n_kv_heads) * d
    ):
        return decode_attention_reference(qkv, n_heads, n_kv_heads, cos, nsin, cache_k, cache_v, slots,
                                          mask, scale)  # fmt: skip
    kv_len = mask.shape[-1]
    scores = torch.empty(b * n_heads * kv_len, dtype=torch.float32)
    out = torch.empty((b, 1, n_heads * d), dtype=torch.float32)
    lib.llmctl_decode_attention_f32(
        qkv.data_ptr(), qkv.shape[-1], b, n_heads, n_kv_heads, d, cos.data_ptr(), nsin.data_ptr(),
        cache_k.data_ptr(), cache_v.data_ptr(), cache_k.shape[2], slots.data_ptr(), mask.data_ptr(),
        mask.stride(0), kv_len, scale, scores.data_ptr(), out.data_ptr(),
    )  # fmt: skip
    return out
