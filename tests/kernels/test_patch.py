"""patch_model: a patched tiny Llama/Qwen2/Mistral gives the unpatched model's logits and gradients, with
the Triton kernels really running (on the CPU under TRITON_INTERPRET=1, LLMCTL_KERNELS=triton)."""

from __future__ import annotations

import copy
import types

import pytest
import torch

from llmctl.core.errors import LlmctlError
from llmctl.kernels import dispatch, patch_model
from tests.kernels._check import assert_close

transformers = pytest.importorskip("transformers")

ARCHS = ["llama", "qwen2", "mistral"]


def _tiny(arch: str, device: str, **overrides):
    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,  # not a power of two
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        max_position_embeddings=256,
        attn_implementation="eager",
    )
    common.update(overrides)
    config_cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
    }[arch]
    model_cls = {
        "llama": transformers.LlamaForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "mistral": transformers.MistralForCausalLM,
    }[arch]
    torch.manual_seed(0)
    model = model_cls(config_cls(**common)).to(device)
    with torch.no_grad():  # non-trivial norm weights, so a wrong weight gradient cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture
def kernel_calls(monkeypatch):
    """Count calls into each kernel's Triton path (proves the patched model really used the kernels)."""
    calls: dict[str, int] = {}
    for name in ("rms_norm", "rope", "swiglu", "attention", "fused_linear_ce"):
        spec = dispatch._REGISTRY.get(name)
        if spec is None or spec.triton is None:
            continue

        def counted(*args, _fn=spec.triton, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*args, **kwargs)

        monkeypatch.setitem(
            dispatch._REGISTRY, name, dispatch.KernelSpec(name, spec.torch, counted, spec.reference)
        )
    return calls


def _forward_backward(model, input_ids, position_ids=None):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, position_ids=position_ids, labels=input_ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


@pytest.mark.parametrize("arch", ARCHS)
def test_patched_tiny_model_matches_unpatched_logits_and_gradients(arch, device, kernel_calls):
    reference = _tiny(arch, device)
    patched = copy.deepcopy(reference)
    summary = patch_model(patched)
    assert summary.patched == {"rms_norm": 5, "swiglu": 2, "rope": 2}, str(summary)
    input_ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1)).to(device)

    ref_logits, ref_loss, ref_grads = _forward_backward(reference, input_ids)
    assert kernel_calls == {}, "the unpatched model must not touch the kernels"
    logits, loss, grads = _forward_backward(patched, input_ids)
    assert kernel_calls == {"rms_norm": 5, "swiglu": 2, "rope": 2}

    assert_close(logits, ref_logits, torch.float32, tol=1e-5, what=f"{arch} logits")
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], torch.float32, tol=1e-4, what=f"{arch} d{name}")


def test_packed_position_ids_are_honoured(device, kernel_calls):
    """Two sequences packed in one row (positions restart): still equal to the unpatched model."""
    reference = _tiny("llama", device)
    patched = copy.deepcopy(reference)
    patch_model(patched)
    input_ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(2)).to(device)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]], device=device)
    with torch.no_grad():
        ref = reference(input_ids=input_ids, position_ids=position_ids).logits
        out = patched(input_ids=input_ids, position_ids=position_ids).logits
    assert kernel_calls["rope"] == 2
    assert_close(out, ref, torch.float32, tol=1e-5, what="packed logits")


def test_patching_twice_is_a_no_op_and_says_so(device):
    model = _tiny("llama", device)
    first = patch_model(model)
    second = patch_model(model)
    assert second.patched == {"rms_norm": 0, "swiglu": 0, "rope": 0}
    assert second.already == first.patched
    assert "already" in str(second)
    ids = torch.tensor([[1, 2, 3]], device=device)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_greedy_generation_with_kv_cache_is_unchanged(device):
    reference = _tiny("qwen2", device)
    patched = copy.deepcopy(reference)
    patch_model(patched)
    ids = torch.tensor([[5, 9, 17, 3]], device=device)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(ids, **kwargs), reference.generate(ids, **kwargs))


def test_non_silu_activation_skips_swiglu_but_patches_the_rest(device):
    model = _tiny("llama", device, hidden_act="gelu")
    summary = patch_model(model)
    assert "swiglu" in summary.skipped and summary.patched["rms_norm"] == 5


def test_unknown_architectures_and_unwired_kernels_are_refused(device):
    fake = torch.nn.Linear(2, 2)
    fake.config = types.SimpleNamespace(model_type="gpt2")
    with pytest.raises(LlmctlError, match="supports llama, mistral, qwen2; this model is gpt2"):
        patch_model(fake)
    with pytest.raises(LlmctlError, match="without a config"):
        patch_model(torch.nn.Linear(2, 2))


def test_attention_option_uses_the_flash_kernel_and_falls_back_to_sdpa_with_padding(device, kernel_calls):
    pytest.importorskip("llmctl.kernels.attention")
    reference = _tiny("llama", device)
    patched = copy.deepcopy(reference)
    summary = patch_model(patched, attention=True)
    assert summary.patched["attention"] == 2 and patched.config._attn_implementation == "llmctl_attention"
    assert reference.config._attn_implementation == "eager"
    assert patch_model(patched, attention=True).already["attention"] == 2

    input_ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(4)).to(device)
    ref_logits, _, ref_grads = _forward_backward(reference, input_ids)
    logits, _, grads = _forward_backward(patched, input_ids)
    assert kernel_calls["attention"] == 2
    assert_close(logits, ref_logits, torch.float32, tol=1e-5, what="attention=True logits")
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], torch.float32, tol=1e-4, what=f"attention=True d{name}")

    mask = torch.ones_like(input_ids)
    mask[0, :4] = 0  # left padding: HF builds a mask, so SDPA runs instead of the kernel
    with torch.no_grad():
        out = patched(input_ids=input_ids, attention_mask=mask).logits
        ref = reference(input_ids=input_ids, attention_mask=mask).logits
    assert kernel_calls["attention"] == 2
    keep = mask.bool()
    assert_close(out[keep], ref[keep], torch.float32, tol=1e-5, what="padded logits (fallback)")


def test_cross_entropy_option_gives_the_same_loss_and_gradients_without_logits(device, kernel_calls):
    arch = "qwen2"  # tied to nothing Llama-specific; Llama's path is covered by the LoRA test below
    pytest.importorskip("llmctl.kernels.fused_linear_ce")
    reference = _tiny(arch, device)
    patched = copy.deepcopy(reference)
    summary = patch_model(patched, cross_entropy=True)
    assert summary.patched["cross_entropy"] == 1
    input_ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(5)).to(device)
    labels = input_ids.clone()
    labels[0, :3] = -100  # a masked prompt

    for kwargs in ({}, {"num_items_in_batch": torch.tensor(17)}):  # mean, and HF Trainer's sum / n
        reference.zero_grad(set_to_none=True)
        patched.zero_grad(set_to_none=True)
        ref = reference(input_ids=input_ids, labels=labels, **kwargs)
        ref.loss.backward()
        out = patched(input_ids=input_ids, labels=labels, **kwargs)
        assert out.logits is None  # never materialised
        out.loss.backward()
        assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
        for (name, p), q in zip(patched.named_parameters(), reference.parameters(), strict=True):
            assert_close(p.grad, q.grad, torch.float32, tol=1e-4, what=f"{arch} ce d{name}")
    assert kernel_calls["fused_linear_ce"] == 2

    patched.eval()  # outside training the original forward runs and returns logits
    with torch.no_grad():
        assert patched(input_ids=input_ids, labels=labels).logits is not None
    assert kernel_calls["fused_linear_ce"] == 2


def test_lora_wrapped_model_with_gradient_checkpointing_is_patched_through_the_wrapper(device, kernel_calls):
    peft = pytest.importorskip("peft")
    base = _tiny("llama", device)
    lora = peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"], init_lora_weights=False
    )
    reference = peft.get_peft_model(base, lora)
    patched = copy.deepcopy(reference)
    summary = patch_model(patched, cross_entropy=True)
    assert summary.patched == {"rms_norm": 5, "swiglu": 2, "rope": 2, "cross_entropy": 1}
    for model in (reference, patched):
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    input_ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(6)).to(device)
    ref_loss = reference(input_ids=input_ids, labels=input_ids).loss
    ref_loss.backward()
    loss = patched(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert kernel_calls["fused_linear_ce"] == 1 and kernel_calls["rope"] >= 2
    trained = [(n, p.grad) for n, p in patched.named_parameters() if p.requires_grad]
    ref_grads = [p.grad for p in reference.parameters() if p.requires_grad]
    assert trained and len(trained) == len(ref_grads)
    for (name, grad), ref in zip(trained, ref_grads, strict=True):
        assert_close(grad, ref, torch.float32, tol=1e-4, what=f"lora d{name}")
