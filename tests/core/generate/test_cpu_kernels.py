"""llmctl's CPU decode kernels (C, AVX2/FMA) against their torch definitions, and the torch fallback."""

import logging

import pytest
import torch
import torch.nn.functional as F

from llmctl.core.generate import cpu_kernels

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="no AVX2 CPU or C compiler here")


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 16])
@pytest.mark.parametrize(("n", "k"), [(64, 32), (45, 21), (3, 8), (70, 1536)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_f_linear_for_every_row_count_and_odd_shapes(rows, n, k, bias):
    gen = torch.Generator().manual_seed(rows * 1000 + n + k)
    x = torch.randn(rows, k, generator=gen)
    w = torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    with torch.inference_mode():
        got = cpu_kernels.linear(x, w, b)
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    # float32 rounding only: as close to the exact product as F.linear (MKL) is, within a small factor
    ours = (got.double() - exact).abs().max().item()
    theirs = (F.linear(x, w, b).double() - exact).abs().max().item()
    assert ours <= 4 * theirs + 1e-6, (ours, theirs)


@needs_kernels
def test_linear_reads_strided_rows_and_keeps_leading_dimensions():
    x = torch.randn(3, 5, 40)[:, -1:]  # [3, 1, 40], rows 200 floats apart: what DecoderLM's last_only gives
    w = torch.randn(24, 40)
    with torch.inference_mode():
        got = cpu_kernels.linear(x, w)
    assert got.shape == (3, 1, 24)
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_linear_hands_what_it_does_not_take_to_f_linear():
    w = torch.randn(8, 16, requires_grad=True)
    x = torch.randn(17, 16)  # more than MAX_ROWS rows
    assert not cpu_kernels.can_run_linear(x, w.detach())
    assert not cpu_kernels.can_run_linear(x[:2].double(), w.detach().double())
    assert not cpu_kernels.can_run_linear(x[:2], w.detach().T.contiguous().T)  # column-major weight
    y = cpu_kernels.linear(x[:2], w)  # needs a gradient: autograd must see it
    y.sum().backward()
    assert w.grad is not None


@needs_kernels
@pytest.mark.parametrize(("rows", "dim"), [(1, 576), (4, 37), (3, 8)])
def test_rms_norm_matches_transformers_definition(rows, dim):
    x = torch.randn(rows, 1, dim) * 3
    w = torch.randn(dim)
    with torch.inference_mode():
        got = cpu_kernels.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(got, cpu_kernels.rms_norm_reference(x, w, 1e-5), rtol=2e-6, atol=2e-6)


def _attention_inputs(b, heads, kv_heads, d, max_len, slot, seed):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, 1, (heads + 2 * kv_heads) * d, generator=gen)
    angles = torch.rand(b, 1, 1, d // 2, generator=gen) * 6
    cos = torch.cat((angles.cos(), angles.cos()), -1)
    nsin = torch.cat((-angles.sin(), angles.sin()), -1)
    cache = torch.randn(b, kv_heads, max_len, d, generator=gen)
    valid = torch.ones(b, max_len, dtype=torch.bool)
    valid[0, :3] = False  # left padding of the first row
    if b > 2:
        valid[2, 1] = False
    mask = valid[:, None, None, : slot + 1]  # a view with row stride max_len, as the engine builds it
    return qkv, cos, nsin, cache, cache.clone() * 0.5, torch.tensor([slot]), mask


@needs_kernels
@pytest.mark.parametrize(("b", "heads", "kv_heads", "d"), [(1, 9, 3, 64), (3, 4, 4, 16), (2, 6, 2, 12)])
def test_decode_attention_matches_rope_cache_write_and_sdpa(b, heads, kv_heads, d):
    slot, max_len = 9, 16
    qkv, cos, nsin, k, v, slots, mask = _attention_inputs(b, heads, kv_heads, d, max_len, slot, seed=b + d)
    ref_k, ref_v = k.clone(), v.clone()
    with torch.inference_mode():
        want = cpu_kernels.decode_attention_reference(
            qkv, heads, kv_heads, cos, nsin, ref_k, ref_v, slots, mask, d**-0.5
        )
        got = cpu_kernels.decode_attention(qkv, heads, kv_heads, cos, nsin, k, v, slots, mask, d**-0.5)
    assert got.shape == (b, 1, heads * d)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, ref_k, rtol=1e-6, atol=1e-6)  # the rotated key, at the slot only
    assert torch.equal(v, ref_v)


@needs_kernels
def test_decode_attention_takes_the_gqa_repeated_mask_too():
    """DecoderLM.forward repeats the mask for GQA ([B, 1, groups, kv_len]); the kernel reads its first row."""
    qkv, cos, nsin, k, v, slots, mask = _attention_inputs(2, 6, 2, 16, 12, 7, seed=5)
    repeated = mask.expand(2, 1, 1, 8).repeat(1, 1, 3, 1)
    with torch.inference_mode():
        a = cpu_kernels.decode_attention(qkv, 6, 2, cos, nsin, k.clone(), v.clone(), slots, mask, 0.25)
        b = cpu_kernels.decode_attention(qkv, 6, 2, cos, nsin, k.clone(), v.clone(), slots, repeated, 0.25)
    assert torch.equal(a, b)


def test_without_a_compiler_the_kernels_are_unavailable_with_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "_supported", lambda: True)
    monkeypatch.setenv("LLMCTL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-llmctl")
    with caplog.at_level(logging.WARNING):
        assert not cpu_kernels.available()
    assert "no C compiler 'no-such-compiler-llmctl'" in caplog.text
    x, w = torch.randn(1, 8), torch.randn(4, 8)
    torch.testing.assert_close(cpu_kernels.linear(x, w), F.linear(x, w))  # still right, through torch


def test_a_failing_compile_is_an_error_naming_the_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMCTL_CACHE", str(tmp_path))
    with pytest.raises(OSError, match="false failed on cpu_kernels.c"):
        cpu_kernels.build("false")
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-written is left to load


@needs_kernels
def test_build_compiles_once_per_source(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMCTL_CACHE", str(tmp_path))
    first = cpu_kernels.build()
    stamp = first.stat().st_mtime_ns
    assert cpu_kernels.build() == first and first.stat().st_mtime_ns == stamp


def test_the_environment_switches_the_kernels_off(monkeypatch):
    monkeypatch.setenv("LLMCTL_CPU_KERNELS", "0")
    assert not cpu_kernels.available()


@needs_kernels
def test_inputs_whose_rows_are_not_contiguous_are_copied_and_kept_alive_for_the_kernel():
    x = torch.randn(2, 3, 8).transpose(1, 2)[..., :2]  # [2, 8, 2]: 16 rows, last dimension strided
    assert cpu_kernels.can_run_linear(x, torch.randn(6, 2)) and not x.is_contiguous()
    w = torch.randn(6, 2)
    with torch.inference_mode():
        got = cpu_kernels.linear(x, w)
        norm = cpu_kernels.rms_norm(x, torch.ones(2), 1e-5)
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm, cpu_kernels.rms_norm_reference(x, torch.ones(2), 1e-5))
