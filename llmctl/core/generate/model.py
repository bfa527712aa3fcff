"""A Llama-family decoder for inference, in plain torch, with a preallocated KV cache.

Covers the architectures llmctl writes and converts: ``llama`` (and SmolLM2), ``mistral`` (without a
sliding window) and ``qwen2`` (q/k/v biases). Module and parameter names mirror Hugging Face's
(``model.layers.N.self_attn.q_proj.weight`` ...) so a checkpoint's state dict loads as is.

The arithmetic follows transformers' definitions so that greedy decoding gives the same tokens:
RMSNorm in float32, RoPE over the rotate-half layout with inverse frequencies from transformers' own
``ROPE_INIT_FUNCTIONS`` (default, llama3, linear, dynamic, yarn ...), scaled-dot-product attention.

Cache layout (gpt-fast style): one ``[batch, kv_heads, max_len, head_dim]`` tensor per layer for keys and
for values. Prompts are left-padded to a common length, so every row writes the same cache slot at each
step; padding slots are masked out, and each row's RoPE positions count its real tokens only.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.core.errors import ModelError
from llmctl.core.generate import cpu_kernels

SUPPORTED = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_eps: float
    max_position: int
    tie_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool

    @classmethod
    def from_hf(cls, config: Any) -> ModelArgs:
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED:
            raise ModelError(
                f"llmctl's engine does not run model_type {model_type!r} yet; "
                f"supported: {', '.join(SUPPORTED)}"
            )
        if model_type in ("mistral", "qwen2") and _sliding_window_active(config):
            raise ModelError(
                f"{model_type} with a sliding attention window is not supported by the engine yet"
            )
        n_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        qkv_bias = bool(getattr(config, "attention_bias", False)) or model_type == "qwen2"
        return cls(
            model_type=model_type,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            n_layers=config.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
            head_dim=head_dim,
            rms_eps=config.rms_norm_eps,
            max_position=config.max_position_embeddings,
            tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
        )


def _sliding_window_active(config: Any) -> bool:
    window = getattr(config, "sliding_window", None)
    if config.model_type == "qwen2":
        return bool(getattr(config, "use_sliding_window", False)) and window is not None
    return window is not None and window < config.max_position_embeddings


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernel = None  # llmctl.kernels' Triton RMSNorm, when DecoderLM.use_kernels() set it
        self.cpu_kernel = False  # cpu_kernels.rms_norm, when DecoderLM.cpu_layout() found the kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x, self.weight, self.eps)
        if self.cpu_kernel:
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
        return cpu_kernels.rms_norm_reference(x, self.weight, self.eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
        self.q_proj = nn.Linear(a.hidden_size, a.n_heads * a.head_dim, bias=a.qkv_bias)
        self.k_proj = nn.Linear(a.hidden_size, a.n_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.v_proj = nn.Linear(a.hidden_size, a.n_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.o_proj = nn.Linear(a.n_heads * a.head_dim, a.hidden_size, bias=a.o_bias)
        self.rope_kernel = None  # llmctl.kernels' Triton RoPE, when DecoderLM.use_kernels() set it
        self.qkv: Fused | None = None  # q/k/v in one weight, when DecoderLM.cpu_layout() set it
        self.decode_kernel = False  # cpu_kernels.decode_attention for T == 1 (set by cpu_layout)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q_proj(x), k_proj(x), v_proj(x)``: one matrix product when the weights are fused."""
        if self.qkv is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.qkv(x)

    def project_qk_v(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[q_proj(x), k_proj(x)]`` side by side (``[B, T, (heads + kv_heads) * head_dim]``, rotated
        together) and ``v_proj(x)``: views of one product when the weights are fused."""
        if self.qkv is None:
            return torch.cat((self.q_proj(x), self.k_proj(x)), dim=-1), self.v_proj(x)
        qkv = self.qkv.product(x)
        split = (self.n_heads + self.n_kv_heads) * self.head_dim
        return qkv[..., :split], qkv[..., split:]

    def forward(self, x, cos, sin, cache_k, cache_v, slots, mask):
        # x: [B, T, hidden]; cache_*: [B, kv_heads, max_len, head_dim]; cos/sin: [B, T, head_dim] for the
        # RoPE kernel, else [B, T, 1, head_dim] with sin's first half negated (DecoderLM.forward).
        # slots: [T] cache positions written by this call; mask: [B, 1, T, kv_len] bool (True = attend),
        # under GQA already [B, 1, groups * T, kv_len] (gqa_mask, once per forward in DecoderLM.forward)
        b, t, _ = x.shape
        if t == 1 and self.decode_kernel:  # RoPE, cache write and attention in one call
            qkv = self.qkv.product(x)
            out = cpu_kernels.decode_attention(qkv, self.n_heads, self.n_kv_heads, cos, sin, cache_k, cache_v,
                                               slots, mask, self.head_dim**-0.5)  # fmt: skip
            return self.o_proj(out)
        qk, v = self.project_qk_v(x)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        qk = qk.view(b, t, self.n_heads + self.n_kv_heads, self.head_dim)
        if self.rope_kernel is not None:  # rotates [B, T, heads, D] with per-token cos/sin [B, T, D]
            q, k = self.rope_kernel(qk[:, :, : self.n_heads], qk[:, :, self.n_heads :], cos, sin)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        else:  # queries and keys in one go: transformers' x * cos + rotate_half(x) * sin, bit for bit
            qk = cpu_kernels.rope_signed(qk, cos, sin)
            q, k = qk[:, :, : self.n_heads].transpose(1, 2), qk[:, :, self.n_heads :].transpose(1, 2)
        cache_k[:, :, slots] = k
        cache_v[:, :, slots] = v
        kv_len = mask.shape[-1]
        keys, values = cache_k[:, :, :kv_len], cache_v[:, :, :kv_len]
        groups = self.n_heads // self.n_kv_heads
        if groups > 1:
            # GQA without copying the cache: the query heads that share a kv head become extra query rows.
            # q: [B, H, T, D] -> [B, kv_heads, groups * T, D], the rows gqa_mask repeated the mask for.
            q = q.reshape(b, self.n_kv_heads, groups * t, self.head_dim)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.head_dim**-0.5)
        out = out.reshape(b, self.n_heads, t, self.head_dim)  # back to [B, H, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def _kernel_forward(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return cpu_kernels.linear(x, linear.weight, linear.bias)


def gqa_mask(mask: torch.Tensor, groups: int, b: int, t: int) -> torch.Tensor:
    """``[B, 1, T, kv_len]`` (or broadcastable to it) -> ``[B, 1, groups * T, kv_len]``: the mask rows of
    the query heads that share a kv head, laid out as :class:`Attention` lays out their queries."""
    return mask.expand(b, 1, t, mask.shape[-1]).repeat(1, 1, groups, 1)


class MLP(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias)
        self.kernel = None  # llmctl.kernels' Triton SwiGLU, when DecoderLM.use_kernels() set it
        self.gate_up: Fused | None = None  # gate/up in one weight, when DecoderLM.cpu_layout() set it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = (self.gate_proj(x), self.up_proj(x)) if self.gate_up is None else self.gate_up(x)
        if self.kernel is not None:
            return self.down_proj(self.kernel(gate, up))
        return self.down_proj(F.silu(gate) * up)


class Fused:
    """Linears that read the same input, as one matrix product: their weights (and biases) are stacked in
    one tensor, and each linear's parameters become views into it, so the state dict and every other
    user of the modules see them unchanged and no memory is added."""

    def __init__(self, linears: list[nn.Linear], linear=F.linear) -> None:
        self.linears = linears
        self.linear = linear  # F.linear, or cpu_kernels.linear
        self.weight = torch.cat([m.weight.detach() for m in linears])
        has_bias = linears[0].bias is not None
        self.bias = torch.cat([m.bias.detach() for m in linears]) if has_bias else None
        self.sizes = [m.out_features for m in linears]
        self._share()

    def relayout(self, convert) -> None:
        """Store the stacked weight as ``convert(weight)`` (same values, other strides)."""
        self.weight = convert(self.weight)
        self._share()

    def _share(self) -> None:
        start = 0
        for m, n in zip(self.linears, self.sizes, strict=True):
            m.weight = nn.Parameter(self.weight[start : start + n], requires_grad=False)
            if self.bias is not None:
                m.bias = nn.Parameter(self.bias[start : start + n], requires_grad=False)
            start += n

    @staticmethod
    def possible(linears: list[nn.Module]) -> bool:
        """Plain float linears (not quantized or factored ones), all with or all without a bias."""
        return all(type(m) is nn.Linear for m in linears) and len({m.bias is None for m in linears}) == 1

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's output side by side: ``[..., sum of out_features]``."""
        return self.linear(x, self.weight, self.bias)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.product(x).split(self.sizes, dim=-1)


class DecoderLayer(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_eps)
        self.self_attn = Attention(a)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_eps)
        self.mlp = MLP(a)

    def forward(self, x, cos, sin, cache_k, cache_v, slots, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache_k, cache_v, slots, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(a) for _ in range(a.n_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_eps)


class DecoderLM(nn.Module):
    """``logits = model(tokens, positions, slots, mask, cache)``; see :class:`KVCache`."""

    def __init__(self, args: ModelArgs, hf_config: Any) -> None:
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self._fused: list[Fused] = []  # cpu_layout's fused groups and other float linears, for column_major
        self._plain: list[nn.Linear] = []
        self._column_major = False
        self._kernel = False  # cpu_layout found llmctl's CPU kernels (cpu_kernels)
        self._rope_kernel = False  # use_kernels set the Triton RoPE
        inv_freq, scaling = _rope_parameters(hf_config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rope_scaling = scaling

    def use_kernels(self) -> int:
        """Route RMSNorm, RoPE and SwiGLU through llmctl's Triton kernels (on CUDA; on a CPU only under
        ``TRITON_INTERPRET=1``, for tests). Attention stays on SDPA (it takes the padding mask).
        Returns how many modules now use a kernel."""
        from llmctl.kernels.rmsnorm import rms_norm_triton
        from llmctl.kernels.rope import rope_triton
        from llmctl.kernels.swiglu import swiglu_triton

        count = 0
        for module in self.modules():
            if isinstance(module, RMSNorm | MLP):
                module.kernel = rms_norm_triton if isinstance(module, RMSNorm) else swiglu_triton
                count += 1
            elif isinstance(module, Attention):
                module.rope_kernel = rope_triton
                module.decode_kernel = False  # the Triton RoPE takes the place of the CPU decode kernel
                self._rope_kernel = True
                count += 1
        return count

    def tie(self) -> None:
        if self.args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def cpu_layout(self) -> int:
        """Prepare the float32 linears for decoding on a CPU; returns how many linears were fused.

        q/k/v and gate/up run as one matrix product each (:class:`Fused`; the linears' weights become views
        of the stacked tensor, so the state dict is unchanged and no memory is added): five small products
        per layer become two larger ones. Every float32 linear (fused, ``o_proj``, ``down_proj``,
        ``lm_head``) then goes through :func:`~llmctl.core.generate.cpu_kernels.linear` when llmctl's CPU
        kernels are available: up to 16 rows (decoding) it streams the weights once at close to memory
        bandwidth; larger inputs go to ``F.linear``. With the kernels, float32 RMSNorms use
        :func:`~llmctl.core.generate.cpu_kernels.rms_norm`, and a decode step's attention (one new token
        per row, fused q/k/v) :func:`~llmctl.core.generate.cpu_kernels.decode_attention`. Without them,
        the weights' layout is chosen per batch size with :meth:`column_major`."""
        self._kernel = cpu_kernels.available()
        linear = cpu_kernels.linear if self._kernel else F.linear
        members: set[int] = set()
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for group, owner, name in (([attn.q_proj, attn.k_proj, attn.v_proj], attn, "qkv"),
                                       ([mlp.gate_proj, mlp.up_proj], mlp, "gate_up")):  # fmt: skip
                if Fused.possible(group) and group[0].weight.dtype == torch.float32:
                    setattr(owner, name, Fused(group, linear))
                    self._fused.append(getattr(owner, name))
                    members.update(id(m) for m in group)
            attn.decode_kernel = self._kernel and attn.qkv is not None and attn.rope_kernel is None
        for module in [*self.model.layers.modules(), self.lm_head]:
            if (
                type(module) is nn.Linear
                and module.weight.dtype == torch.float32
                and id(module) not in members
            ):
                self._plain.append(module)
                if self._kernel:  # an instance attribute: the module's type and state dict stay nn.Linear's
                    module.forward = functools.partial(_kernel_forward, module)
        if self._kernel:
            for module in self.modules():
                if isinstance(module, RMSNorm) and module.weight.dtype == torch.float32:
                    module.cpu_kernel = module.kernel is None
        return len(members)

    def column_major(self, on: bool) -> None:
        """Without the CPU kernel (see :meth:`cpu_layout`), store every float32 linear weight (the fused
        ones, ``o_proj``, ``down_proj``, ``lm_head`` and the tied embedding with it) column-major (``on``)
        or row-major. Column-major is still ``[out, in]`` but with each column contiguous, so ``F.linear``
        runs ``x @ Wᵀ`` as a plain GEMM on the ``[in, out]`` layout. On a CPU, MKL's batch-1 product is
        faster on that layout (all of SmolLM2's linears once: 46-50 -> 34-39 ms on this project's 2-core
        machine), while at 4-16 rows the row-major layout is 10-30% faster; the engine picks per batch
        (:func:`llmctl.core.generate.engine._run`). Switching copies each weight once. With the kernel
        (which reads row-major weights) this does nothing."""
        on = on and not self._kernel
        if self._column_major == on:
            return  # (without cpu_layout there is nothing to move: the lists are empty)
        convert = (lambda w: w.T.contiguous().T) if on else (lambda w: w.contiguous())  # noqa: E731
        for fused in self._fused:
            fused.relayout(convert)
        for module in self._plain:
            moved = nn.Parameter(convert(module.weight.detach()), requires_grad=False)
            module.weight = moved
            if module is self.lm_head and self.args.tie_embeddings:
                self.model.embed_tokens.weight = moved
        self._column_major = on

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [B, T] -> cos, sin: [B, T, head_dim], computed in float32 as transformers does
        freqs = positions[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.rope_scaling).to(dtype), (emb.sin() * self.rope_scaling).to(dtype)

    def forward(self, tokens, positions, slots, mask, cache: KVCache, last_only: bool = True, head=None):
        """Logits ``[B, T or 1, vocab]`` (float32) of ``tokens`` at cache ``slots``; ``head`` (the final-norm
        hidden states -> logits) replaces ``lm_head``, e.g. a draft's :class:`~llmctl.core.generate.
        speculative.DraftVocab`."""
        x = self.model.embed_tokens(tokens)
        cos, sin = self.rope(positions, x.dtype)
        if not self._rope_kernel:  # Attention's torch RoPE: [B, T, 1, D], sin's first half negated
            half = sin.shape[-1] // 2
            cos, sin = cos[:, :, None], torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, :, None]
        groups = self.args.n_heads // self.args.n_kv_heads
        if groups > 1:  # once per forward instead of once per layer
            mask = gqa_mask(mask, groups, *tokens.shape)
        for layer, k, v in zip(self.model.layers, cache.k, cache.v, strict=True):
            x = layer(x, cos, sin, k, v, slots, mask)
        if last_only:
            x = x[:, -1:]
        return (head or self.lm_head)(self.model.norm(x)).float()


def _rope_parameters(config: Any) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling, from transformers' own RoPE definitions."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS or rope_type == "dynamic":
        raise ModelError(f"RoPE type {rope_type!r} is not supported by llmctl's engine")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq, float(scaling)


class KVCache:
    """Preallocated keys and values for every layer: ``[batch, kv_heads, max_len, head_dim]`` each."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, device, dtype) -> None:
        shape = (batch, args.n_kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.max_len = max_len


def load_decoder(ref, *, device: str = "auto", dtype: str = "auto") -> tuple[DecoderLM, Any]:
    """The engine's model for a model directory or GGUF file, and the Hugging Face config it came from."""
    from llmctl.core.models.hf import load_config
    from llmctl.core.runtime import resolve_device, resolve_dtype

    config = load_config(ref)
    args = ModelArgs.from_hf(config)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev, getattr(config, "dtype", None))
    quantized = _quantized_checkpoint(ref)  # GPTQ/AWQ/compressed-tensors directories, else None
    state = quantized.state if quantized else _state_dict(ref, torch_dtype)
    with torch.device("meta"):  # no memory for random weights that are overwritten at once
        model = DecoderLM(args, config)
    if quantized:  # quantized linears become llmctl.core.quantize's W4A16Linear / QuantLinear
        state.update(quantized.install(model, torch_dtype, device=dev))
    if getattr(config, "llmctl_lowrank", None):  # llmctl prune --method lowrank: factored linears
        from llmctl.core.prune.lowrank import apply_lowrank  # (see there); swapped on meta, loaded below

        apply_lowrank(model, config.llmctl_lowrank)
    inv_freq, _ = _rope_parameters(config)
    if args.tie_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (args.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ModelError(
            f"weights of {ref.path} do not match a {args.model_type} model: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.inv_freq = inv_freq  # replaces the meta buffer; RoPE angles stay float32
    model.tie()
    model.to(device=dev, dtype=torch_dtype)
    model.inv_freq = inv_freq.to(dev)
    model.eval()
    if torch.device(dev).type == "cpu":
        model.cpu_layout()
    on_cuda = torch.device(dev).type == "cuda"
    if on_cuda or os.environ.get("LLMCTL_KERNELS", "").strip().lower() == "triton":
        from llmctl.kernels.dispatch import kernel_backend  # imports Triton: only where it may be used

        if kernel_backend(on_cuda=on_cuda) == "triton":
            model.use_kernels()
    return model, config


def _state_dict(ref, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors of a Hugging Face directory (safetensors, shard by shard) or a GGUF file (via transformers)."""
    from llmctl.core.models.hf import load_model, read_safetensors

    if ref.kind == "gguf":
        hf = load_model(ref, device="cpu", dtype="float32")
        return {k: v.to(dtype) for k, v in hf.state_dict().items()}
    return read_safetensors(ref.path, dtype)


def _quantized_checkpoint(ref):
    """The quantized layers and other tensors of a GPTQ/AWQ/compressed-tensors directory, or None."""
    from llmctl.core.models.hf import quant_method
    from llmctl.core.quantize.runtime import is_quantized_checkpoint, read_quantized

    if ref.kind != "hf" or not is_quantized_checkpoint(ref.path):
        if ref.kind == "hf" and quant_method(ref.path) == "bitsandbytes":
            raise ModelError(
                f"{ref.path} is a bitsandbytes checkpoint: llmctl's engine does not run it "
                "(llmctl eval loads it through transformers); quantize with gptq, awq or fp8 to generate"
            )
        return None
    return read_quantized(ref.path)
