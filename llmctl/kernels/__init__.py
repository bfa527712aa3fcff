"""Triton GPU kernels, each beside a plain-torch reference, chosen by one dispatcher.

Every kernel registers two implementations under one name: ``torch`` (the reference, runs anywhere, the
definition of correct) and ``triton`` (the fast path on CUDA). :func:`get_kernel` picks one:

- ``LLMCTL_KERNELS=torch`` or ``=triton`` forces a backend (``triton`` on a CPU runs under
  ``TRITON_INTERPRET=1``, which is how CI tests kernels);
- otherwise (``auto``) Triton is used when the inputs live on a CUDA device and Triton imports,
  and the torch reference everywhere else.

``patch_model(model)`` swaps a Hugging Face Llama/Qwen2/Mistral model's norms, rotary embeddings and MLP
activation (optionally attention and the LM-head loss) for kernel-backed ones, Liger-style.
"""

# Importing a kernel module registers it (each file: a torch reference, Triton kernels, a dispatcher).
from llmctl.kernels import (  # noqa: F401
    attention,  # "attention": FlashAttention-2 style causal attention, GQA, varlen
    fused_linear_ce,  # "fused_linear_ce": chunked LM head + cross-entropy
    paged_attention,  # "paged_decode": one decode step over a paged KV cache
    rmsnorm,  # "rms_norm": RMSNorm (+ fused residual add)
    rope,  # "rope": rotary embeddings, default/Llama-3/YaRN frequencies
    swiglu,  # "swiglu": silu(gate) * up
    w4a16,  # "w4a16_matmul": group-wise 4-bit weights x fp16/bf16 activations
)
from llmctl.kernels.dispatch import KernelSpec, available_kernels, get_kernel, kernel_backend, register_kernel
from llmctl.kernels.patch import PatchSummary, patch_model

__all__ = [
    "KernelSpec",
    "PatchSummary",
    "available_kernels",
    "get_kernel",
    "kernel_backend",
    "patch_model",
    "register_kernel",
]
