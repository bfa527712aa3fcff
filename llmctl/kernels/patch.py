"""``patch_model``: swap a Hugging Face Llama/Qwen2/Mistral model's hot spots for llmctl's kernels, in place.

Liger-Kernel style (https://github.com/linkedin/Liger-Kernel): the model keeps its modules, parameters,
state-dict keys and ``isinstance`` checks; only the computation behind three of them changes:

- every ``<Arch>RMSNorm`` module's ``forward`` -> :func:`llmctl.kernels.rmsnorm.rms_norm` (same Llama
  convention: fp32 inside, cast back to the input dtype, then the weight);
- every ``<Arch>MLP``'s ``forward`` -> ``down_proj(swiglu(gate_proj(x), up_proj(x)))`` when the activation
  is SiLU (LoRA-wrapped projections keep working, they are called as before);
- rotary embedding: the modeling module's ``apply_rotary_pos_emb`` (which the attention forward calls by
  name) is replaced by a switch that uses :func:`llmctl.kernels.rope.rope` *only inside the forward of a
  patched attention module* and the original function everywhere else, so an unpatched model of the
  same architecture in the same process is unaffected.

The patched forwards call the dispatchers, so the choice of backend stays per call: Triton on CUDA
tensors, the torch reference on the CPU (``LLMCTL_KERNELS=torch|triton`` overrides). Patching twice is a
no-op (the summary counts modules as ``already``). Each kernel is one entry in :data:`PATCHES`; fused
attention and linear-cross-entropy plug in there when their kernels land (``attention=True`` /
``cross_entropy=True`` are refused until then).
"""

from __future__ import annotations

import contextvars
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llmctl.core.errors import LlmctlError
from llmctl.kernels.rmsnorm import rms_norm
from llmctl.kernels.rope import rope
from llmctl.kernels.swiglu import swiglu


@dataclass(frozen=True)
class ArchSpec:
    """Class names of the modules a patch touches, per ``config.model_type``."""

    norm: str  # RMSNorm module class
    mlp: str  # gated MLP with gate_proj / up_proj / down_proj and act_fn
    attention: str  # attention module whose forward calls the modeling module's apply_rotary_pos_emb


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("LlamaRMSNorm", "LlamaMLP", "LlamaAttention"),
    "qwen2": ArchSpec("Qwen2RMSNorm", "Qwen2MLP", "Qwen2Attention"),
    "mistral": ArchSpec("MistralRMSNorm", "MistralMLP", "MistralAttention"),
}

SILU_ACTIVATIONS = ("silu", "swish")


@dataclass
class PatchSummary:
    """What :func:`patch_model` did: modules newly patched, already patched, and kernels skipped (why)."""

    architecture: str
    patched: dict[str, int] = field(default_factory=dict)  # kernel -> modules patched by this call
    already: dict[str, int] = field(default_factory=dict)  # kernel -> modules patched by an earlier call
    skipped: dict[str, str] = field(default_factory=dict)  # kernel -> reason

    def total(self, kernel: str) -> int:
        return self.patched.get(kernel, 0) + self.already.get(kernel, 0)

    def as_dict(self) -> dict:
        return {
            "architecture": self.architecture,
            "patched": dict(self.patched),
            "already": dict(self.already),
            "skipped": dict(self.skipped),
        }

    def __str__(self) -> str:
        parts = [
            f"{kernel} x{self.total(kernel)}"
            + (f" ({self.already[kernel]} already)" if self.already.get(kernel) else "")
            for kernel in sorted(set(self.patched) | set(self.already))
        ]
        parts += [f"{kernel} skipped: {why}" for kernel, why in self.skipped.items()]
        return f"{self.architecture}: " + (", ".join(parts) or "nothing patched")


# --- installing a forward -------------------------------------------------------------------------------


def _install_forward(module: torch.nn.Module, fn: Callable, marker: str) -> bool:
    """Bind ``fn`` as the module's forward; False if an earlier call did. Accelerate's hooks (device maps,
    offload) wrap ``forward`` and call ``_old_forward``: replace that one so the hook keeps working."""
    if getattr(module, marker, False):
        return False
    bound = types.MethodType(fn, module)  # a bound method, so deepcopy rebinds it to the copy
    if "_old_forward" in module.__dict__:
        module._old_forward = bound
    else:
        module.forward = bound
    setattr(module, marker, True)
    return True


def _modules_named(model: torch.nn.Module, class_name: str) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == class_name]


# --- RMSNorm ----------------------------------------------------------------------------------------------


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _patch_rms_norm(model, spec: ArchSpec, summary: PatchSummary) -> None:
    norms = _modules_named(model, spec.norm)
    if not norms:
        summary.skipped["rms_norm"] = f"no {spec.norm} modules found"
        return
    for norm in norms:
        if not hasattr(norm, "variance_epsilon") or getattr(norm, "weight", None) is None:
            summary.skipped["rms_norm"] = (
                f"{spec.norm} without weight/variance_epsilon (transformers changed?)"
            )
            return
    _count(summary, "rms_norm", [_install_forward(n, _rms_norm_forward, "_llmctl_rms_norm") for n in norms])


# --- SwiGLU MLP -------------------------------------------------------------------------------------------


def _swiglu_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _patch_swiglu(model, spec: ArchSpec, summary: PatchSummary) -> None:
    act = getattr(model.config, "hidden_act", None)
    if act not in SILU_ACTIVATIONS:
        summary.skipped["swiglu"] = f"hidden_act is {act!r}, not silu"
        return
    mlps = _modules_named(model, spec.mlp)
    if not mlps or not all(hasattr(m, p) for m in mlps for p in ("gate_proj", "up_proj", "down_proj")):
        summary.skipped["swiglu"] = f"no {spec.mlp} modules with gate_proj/up_proj/down_proj found"
        return
    _count(summary, "swiglu", [_install_forward(m, _swiglu_mlp_forward, "_llmctl_swiglu") for m in mlps])


# --- rotary embedding -------------------------------------------------------------------------------------

# True while a patched attention module's forward runs: the replaced apply_rotary_pos_emb then uses the
# kernel.
_IN_PATCHED_ATTENTION = contextvars.ContextVar("llmctl_in_patched_attention", default=False)


def _hf_rope(q, k, cos, sin, unsqueeze_dim: int = 1):
    """HF's ``apply_rotary_pos_emb`` contract on the kernel: q ``[batch, heads, seq, dim]`` (unsqueeze_dim 1)
    or ``[batch, seq, heads, dim]`` (unsqueeze_dim 2), cos/sin ``[batch or 1, seq, dim]``."""
    if unsqueeze_dim == 1:
        qo, ko = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return qo.transpose(1, 2), ko.transpose(1, 2)
    return rope(q, k, cos, sin)


def _make_rotary_switch(original: Callable) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if not _IN_PATCHED_ATTENTION.get() or args or set(kwargs) - {"unsqueeze_dim"}:
            return original(q, k, cos, sin, *args, **kwargs)
        unsqueeze_dim = kwargs.get("unsqueeze_dim", 1)
        if unsqueeze_dim not in (1, 2) or q.dim() != 4 or cos.dim() != 3:
            return original(q, k, cos, sin, *args, **kwargs)
        return _hf_rope(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb._llmctl_original = original
    apply_rotary_pos_emb.__doc__ = (
        "llmctl: the rope kernel inside patched attention modules, else the original."
    )
    return apply_rotary_pos_emb


def _rotary_attention_forward(self, *args, **kwargs):
    token = _IN_PATCHED_ATTENTION.set(True)
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        _IN_PATCHED_ATTENTION.reset(token)


def _patch_rope(model, spec: ArchSpec, summary: PatchSummary) -> None:
    attentions = _modules_named(model, spec.attention)
    if not attentions:
        summary.skipped["rope"] = f"no {spec.attention} modules found"
        return
    modeling = sys.modules.get(type(attentions[0]).__module__)
    current = getattr(modeling, "apply_rotary_pos_emb", None)
    if current is None:
        summary.skipped["rope"] = f"{type(attentions[0]).__module__} has no apply_rotary_pos_emb"
        return
    if getattr(current, "_llmctl_original", None) is None:  # once per process and modeling module
        modeling.apply_rotary_pos_emb = _make_rotary_switch(current)
    _count(
        summary, "rope", [_install_forward(a, _rotary_attention_forward, "_llmctl_rope") for a in attentions]
    )


# --- the registry and the entry point -------------------------------------------------------------------


def _count(summary: PatchSummary, kernel: str, newly: list[bool]) -> None:
    summary.patched[kernel] = sum(newly)
    summary.already[kernel] = len(newly) - sum(newly)


# --- attention ------------------------------------------------------------------------------------------

# registered in transformers' AttentionInterface; no "flash" in the name (HF would look for a hub kernel)
ATTENTION_NAME = "llmctl_attention"


def _make_flash_attention_forward(fallback: Callable) -> Callable:
    """An HF attention function: llmctl's flash kernel when the call is plain causal attention without an
    explicit mask (HF's mask builder returns None exactly when SDPA would run with ``is_causal`` and no
    mask: no padding, no packed sequences, no window that matters), HF's SDPA function otherwise."""

    def llmctl_flash_attention_forward(
        module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
    ):
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        plain = (
            attention_mask is None
            and causal
            and not (dropout and module.training)
            and not kwargs.get("output_attentions")
            and kwargs.get("softcap") is None
            and kwargs.get("position_bias") is None
            and query.shape[-1] <= 128
            and query.shape[2] in (1, key.shape[2])  # decode or full prefill: bottom-right == HF causal
        )
        if not plain:
            kwargs.update(dropout=dropout, scaling=scaling, is_causal=is_causal)
            return fallback(module, query, key, value, attention_mask, **kwargs)
        from llmctl.kernels.attention import flash_attention

        out = flash_attention(query, key, value, causal=True, softmax_scale=scaling)  # [b, heads, seq, d]
        return out.transpose(1, 2).contiguous(), None  # HF wants [b, seq, heads, d]

    return llmctl_flash_attention_forward


def _patch_attention(model, spec: ArchSpec, summary: PatchSummary) -> None:
    try:
        from llmctl.kernels import attention as _attention  # noqa: F401  (the kernel must exist)
    except ImportError as exc:
        raise LlmctlError(f"patch_model: the attention kernel is not available ({exc})") from None
    attentions = _modules_named(model, spec.attention)
    modeling = sys.modules.get(type(attentions[0]).__module__) if attentions else None
    interface = getattr(modeling, "ALL_ATTENTION_FUNCTIONS", None)
    masking = sys.modules.get("transformers.masking_utils")
    masks = getattr(masking, "ALL_MASK_ATTENTION_FUNCTIONS", None)
    if interface is None or masks is None or "sdpa" not in interface or "sdpa" not in masks:
        summary.skipped["attention"] = "this transformers version has no AttentionInterface with sdpa"
        return
    if ATTENTION_NAME not in interface:  # once per process: harmless to models that do not select it
        interface.register(ATTENTION_NAME, _make_flash_attention_forward(interface["sdpa"]))
        masks.register(ATTENTION_NAME, masks["sdpa"])
    if model.config._attn_implementation == ATTENTION_NAME:
        summary.patched["attention"], summary.already["attention"] = 0, len(attentions)
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTENTION_NAME)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = ATTENTION_NAME
    summary.patched["attention"], summary.already["attention"] = len(attentions), 0


# --- fused linear + cross-entropy --------------------------------------------------------------------------

IGNORE_INDEX = -100  # HF's ForCausalLMLoss default


def _fused_ce_causal_lm_forward(self, *args, labels=None, **kwargs):
    """The ForCausalLM forward, but in training with labels the loss comes from the hidden states and the LM
    head weight directly (:func:`fused_linear_cross_entropy`): no [tokens, vocab] logits, ``logits`` is None.
    Everything else (eval, no labels, positional calls, return_dict=False, a wrapped (LoRA) lm_head) runs the
    original forward. The loss is HF's ForCausalLMLoss: shifted labels; mean, or sum / num_items_in_batch."""
    head = self.lm_head
    fuse = (
        labels is not None
        and self.training
        and not args
        and type(head) is torch.nn.Linear
        and kwargs.get("return_dict") is not False
    )
    if not fuse:
        return type(self).forward(self, *args, labels=labels, **kwargs)
    from llmctl.kernels.fused_linear_ce import fused_linear_cross_entropy

    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    ignore_index = kwargs.pop("ignore_index", IGNORE_INDEX)
    kwargs.pop("logits_to_keep", None)
    outputs = self.model(**kwargs)
    hidden = outputs.last_hidden_state
    if hidden.dtype != head.weight.dtype:
        hidden = hidden.to(head.weight.dtype)
    if shift_labels is None:  # tokens < n predict n, as HF's ForCausalLMLoss
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    loss = fused_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        head.weight,
        shift_labels.reshape(-1).to(hidden.device),
        bias=head.bias,
        ignore_index=ignore_index,
        reduction="sum" if num_items_in_batch is not None else "mean",
    )
    if num_items_in_batch is not None:
        loss = loss / (
            num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
        )
    output_cls = self._llmctl_output_cls
    rest = {k: v for k, v in outputs.items() if k != "last_hidden_state"}
    return output_cls(loss=loss, logits=None, **rest)


def _patch_cross_entropy(model, spec: ArchSpec, summary: PatchSummary) -> None:
    try:
        from llmctl.kernels import fused_linear_ce as _ce  # noqa: F401  (the kernel must exist)
    except ImportError as exc:
        raise LlmctlError(
            f"patch_model: the fused linear cross-entropy kernel is not available ({exc})"
        ) from None
    heads = [
        m
        for m in model.modules()
        if type(m).__name__.endswith("ForCausalLM") and hasattr(m, "lm_head") and hasattr(m, "model")
    ]
    if not heads:
        summary.skipped["cross_entropy"] = "no *ForCausalLM module with lm_head and model found"
        return
    output_cls = getattr(sys.modules.get(type(heads[0]).__module__), "CausalLMOutputWithPast", None)
    if output_cls is None:
        summary.skipped["cross_entropy"] = "the modeling module has no CausalLMOutputWithPast"
        return
    for head in heads:
        head._llmctl_output_cls = output_cls
    _count(
        summary,
        "cross_entropy",
        [_install_forward(h, _fused_ce_causal_lm_forward, "_llmctl_cross_entropy") for h in heads],
    )


# kernel -> patch function (model, spec, summary); patch_model has one keyword per entry.
PATCHES: dict[str, Callable[[torch.nn.Module, ArchSpec, PatchSummary], None]] = {
    "rms_norm": _patch_rms_norm,
    "swiglu": _patch_swiglu,
    "rope": _patch_rope,
    "attention": _patch_attention,
    "cross_entropy": _patch_cross_entropy,
}


def patch_model(
    model: torch.nn.Module,
    *,
    rms_norm: bool = True,
    swiglu: bool = True,
    rope: bool = True,
    attention: bool = False,
    cross_entropy: bool = False,
) -> PatchSummary:
    """Patch a Hugging Face Llama/Qwen2/Mistral model (or a PEFT wrapper of one) in place; idempotent.

    Returns a :class:`PatchSummary`. Raises :class:`LlmctlError` for other architectures.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise LlmctlError(
            f"patch_model supports {known}; this model is {model_type or 'without a config.model_type'} "
            f"({type(model).__name__})"
        )
    wanted = {
        "rms_norm": rms_norm,
        "swiglu": swiglu,
        "rope": rope,
        "attention": attention,
        "cross_entropy": cross_entropy,
    }
    summary = PatchSummary(architecture=model_type)
    for kernel, patch in PATCHES.items():
        if wanted[kernel]:
            patch(model, spec, summary)
    return summary


__all__ = ["ARCHITECTURES", "PATCHES", "ArchSpec", "PatchSummary", "patch_model"]
