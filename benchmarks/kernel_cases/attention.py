"""Flash attention vs torch SDPA forced to its flash backend (FlashAttention-2 inside PyTorch).

Full size: batch 4, 32 query heads (and a GQA case with 8 KV heads), sequence 4096, bf16, causal; head dim
128 (the goal: at least 0.9x SDPA's forward) and 64; forward+backward without a goal. FLOPs count the
useful work only: a causal forward is 4*B*H*S*S*D/2, the backward 2.5 times that. On the CPU (interpreter)
the shapes are tiny and SDPA runs its default CPU backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.kernel_cases import Case
from llmctl.kernels import attention as attn


def _sdpa(device: str, gqa: bool, q, k, v):
    """A peer callable on these inputs: SDPA's flash backend on CUDA (GQA natively if it can)."""
    if device != "cuda":
        kk, vv = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        return (lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=True)), "torch SDPA (CPU)"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash(qq, kk, vv, **kw):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, **kw)

    if not gqa:
        return (lambda: flash(q, k, v)), "SDPA flash"
    try:
        flash(q[:, :, :128], k[:, :, :128], v[:, :, :128], enable_gqa=True)
        return (lambda: flash(q, k, v, enable_gqa=True)), "SDPA flash (enable_gqa)"
    except (RuntimeError, TypeError):  # no GQA in this backend: expand k/v once, outside the timing
        kk, vv = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        return (lambda: flash(q, kk, vv)), "SDPA flash (k/v expanded)"


def _fwd_bwd(fn, q, k, v, dout):
    def step():
        out = fn()
        return torch.autograd.grad(out, (q, k, v), dout)

    return step


def cases(device: str, quick: bool) -> list[Case]:
    if quick:
        shapes = [(1, 4, 2, 32, 32, "fwd"), (1, 2, 2, 32, 32, "fwd+bwd")]
        dtype = torch.float32
    else:
        shapes = [
            (4, 32, 32, 4096, 128, "fwd"),
            (4, 32, 8, 4096, 128, "fwd"),
            (4, 32, 32, 4096, 64, "fwd"),
            (4, 32, 32, 4096, 128, "fwd+bwd"),
        ]
        dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    out = []
    for batch, heads_q, heads_kv, seq, head_dim, mode in shapes:
        backward = mode == "fwd+bwd"
        q = torch.randn(batch, heads_q, seq, head_dim, generator=gen).to(device=device, dtype=dtype)
        k = torch.randn(batch, heads_kv, seq, head_dim, generator=gen).to(device=device, dtype=dtype)
        v = torch.randn(batch, heads_kv, seq, head_dim, generator=gen).to(device=device, dtype=dtype)
        q.requires_grad_(backward)
        k.requires_grad_(backward)
        v.requires_grad_(backward)
        peer, peer_name = _sdpa(device, heads_q != heads_kv, q, k, v)

        def ours(q=q, k=k, v=v):
            return attn.flash_attention_triton(q, k, v, causal=True)

        flops = 4.0 * batch * heads_q * seq * seq * head_dim / 2
        if backward:
            dout = torch.randn(q.shape, generator=gen).to(device=device, dtype=dtype)
            ours, peer, flops = _fwd_bwd(ours, q, k, v, dout), _fwd_bwd(peer, q, k, v, dout), 3.5 * flops
        goal = ("speedup", 0.9) if (mode == "fwd" and head_dim == 128 and not quick) else None
        gqa = f" hkv={heads_kv}" if heads_kv != heads_q else ""
        out.append(
            Case(
                kernel=f"attention {mode}",
                shape=f"b={batch} h={heads_q}{gqa} s={seq} d={head_dim} causal {str(dtype)[6:]}",
                run=ours,
                baseline=peer,
                baseline_name=peer_name,
                flops=flops,
                bound="compute",
                goal=goal,
            )
        )
    return out
