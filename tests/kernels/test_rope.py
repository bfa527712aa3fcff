"""RoPE: the Triton kernel against the torch reference (forward, gradients, packed positions) and the
inverse-frequency builders against transformers' ``ROPE_INIT_FUNCTIONS``."""

from __future__ import annotations

import pytest
import torch

from llmctl.kernels.rope import (
    apply_rope,
    default_inv_freq,
    inv_freq_from_rope_parameters,
    llama3_inv_freq,
    rope,
    rope_cos_sin,
    rope_reference,
    rope_triton,
    yarn_inv_freq,
)
from tests.kernels._check import assert_close
from tests.kernels.conftest import ON_CUDA

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (tokens leading shape, heads_q, heads_k, head_dim): GQA ratios, odd head counts, head_dim not 2^k, 1 token
SHAPES = [((2, 5), 4, 2, 16), ((1,), 3, 1, 8), ((7,), 6, 6, 24), ((3, 1), 5, 1, 64)]
if ON_CUDA:
    SHAPES += [((2, 1000), 32, 8, 128), ((4099,), 28, 4, 128), ((3, 257), 12, 12, 64)]


def _qk(lead, hq, hk, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*lead, hq, d, generator=g).to(dtype).to(device).requires_grad_()
    k = torch.randn(*lead, hk, d, generator=g).to(dtype).to(device).requires_grad_()
    return q, k


def _positions(lead, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4096, lead, generator=g).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,hq,hk,d", SHAPES)
def test_rope_forward_and_gradients_match_reference(device, dtype, lead, hq, hk, d):
    q, k = _qk(lead, hq, hk, d, dtype, device)
    qr, kr = (t.detach().clone().requires_grad_() for t in (q, k))
    inv_freq, _ = default_inv_freq(d, 10000.0)
    cos, sin = rope_cos_sin(_positions(lead, device), inv_freq)
    qo, ko = rope_triton(q, k, cos, sin)
    qref, kref = rope_reference(qr, kr, cos, sin)
    assert qo.dtype == dtype and ko.shape == k.shape
    assert_close(qo, qref, dtype, what="rope q")
    assert_close(ko, kref, dtype, what="rope k")
    g = torch.Generator().manual_seed(3)
    dq = torch.randn(q.shape, generator=g).to(dtype).to(device)
    dk = torch.randn(k.shape, generator=g).to(dtype).to(device)
    ((qo * dq).sum() + (ko * dk).sum()).backward()
    ((qref * dq).sum() + (kref * dk).sum()).backward()
    assert_close(q.grad, qr.grad, dtype, what="rope dq")
    assert_close(k.grad, kr.grad, dtype, what="rope dk")


def test_hugging_face_layout_with_broadcast_batch_and_strided_views(device):
    """q/k as HF hands them over ([batch, heads, seq, dim] transposed views), cos/sin [1, seq, dim]."""
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    batch, seq, hq, hk, d = 2, 9, 4, 2, 32
    q = torch.randn(batch, seq, hq, d, device=device).transpose(1, 2)
    k = torch.randn(batch, seq, hk, d, device=device).transpose(1, 2)
    cos, sin = rope_cos_sin(torch.arange(seq, device=device)[None], default_inv_freq(d)[0])
    q_hf, k_hf = modeling.apply_rotary_pos_emb(q, k, cos, sin)
    qo, ko = rope_triton(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # token-major [batch, seq, heads, d]
    assert_close(qo.transpose(1, 2), q_hf, torch.float32, what="vs HF apply_rotary_pos_emb q")
    assert_close(ko.transpose(1, 2), k_hf, torch.float32, what="vs HF apply_rotary_pos_emb k")


def test_packed_sequences_restart_positions_per_sequence(device):
    """Two sequences packed in one row: rotating the pack equals rotating each sequence on its own."""
    d, lens = 16, (5, 3)
    q, k = _qk((sum(lens),), 2, 1, d, torch.float32, device)
    inv_freq, _ = default_inv_freq(d)
    positions = torch.cat([torch.arange(n) for n in lens]).to(device)
    qo, ko = apply_rope(q, k, positions, inv_freq)
    start = 0
    for n in lens:
        qs, ks = apply_rope(
            q[start : start + n], k[start : start + n], torch.arange(n, device=device), inv_freq
        )
        assert_close(qo[start : start + n], qs, torch.float32, what=f"packed q len {n}")
        assert_close(ko[start : start + n], ks, torch.float32, what=f"packed k len {n}")
        start += n


def test_rotation_preserves_norms_and_position_zero_is_identity(device):
    q, k = _qk((4,), 2, 2, 8, torch.float32, device)
    inv_freq, _ = default_inv_freq(8)
    qo, ko = apply_rope(q, k, torch.tensor([0, 1, 100, 4095], device=device), inv_freq)
    assert torch.allclose(qo.norm(dim=-1), q.norm(dim=-1), rtol=1e-5)
    assert torch.allclose(qo[0], q[0]) and torch.allclose(ko[0], k[0])


def test_dispatcher_follows_llmctl_kernels(monkeypatch, device):
    q, k = torch.randn(3, 2, 8, device=device), torch.randn(3, 1, 8, device=device)
    cos, sin = rope_cos_sin(torch.arange(3, device=device), default_inv_freq(8)[0])
    monkeypatch.setenv("LLMCTL_KERNELS", "torch")
    ref = rope(q, k, cos, sin)
    monkeypatch.setenv("LLMCTL_KERNELS", "triton")
    out = rope(q, k, cos, sin)
    assert_close(out[0], ref[0], torch.float32, what="dispatched q")


# --- inverse frequencies vs transformers -------------------------------------------------------------------

ROPE_CASES = [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "default", "rope_theta": 1000000.0},
    {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32768},
    {
        "rope_type": "yarn",
        "rope_theta": 1000000.0,
        "factor": 8.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 16.0,
        "beta_slow": 2.0,
    },
    {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "mscale": 1.0,
        "mscale_all_dim": 0.707,
    },
]


@pytest.mark.parametrize("params", ROPE_CASES, ids=lambda p: f"{p['rope_type']}-{p.get('factor', 1)}")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_inverse_frequencies_match_transformers(params, head_dim):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=131072,
        rope_parameters=dict(params),
    )
    if params["rope_type"] == "default":
        theirs, their_factor = (
            transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config).inv_freq,
            1.0,
        )
    else:
        theirs, their_factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu")
    ours, our_factor = inv_freq_from_rope_parameters(params, head_dim, max_position_embeddings=131072)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=0)
    assert our_factor == pytest.approx(their_factor, rel=1e-6)


def test_builders_scale_only_low_frequencies():
    base, _ = default_inv_freq(128, 500000.0)
    scaled, factor = llama3_inv_freq(128, 500000.0, 8.0, 1.0, 4.0, 8192)
    assert factor == 1.0
    assert scaled[0] == base[0]  # highest frequency untouched
    assert scaled[-1] == pytest.approx(base[-1] / 8)  # lowest divided by the factor
    _, attention = yarn_inv_freq(64, 10000.0, 4.0, 4096)
    assert attention == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)
    with pytest.raises(ValueError, match="not supported"):
        inv_freq_from_rope_parameters({"rope_type": "longrope"}, 64)
