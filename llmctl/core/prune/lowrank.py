"""Low-rank factorization: each selected linear ``W [out, in]`` becomes two thinner ones, ``B [out, r]``
after ``A [r, in]``, from a truncated SVD, stored factored (smaller on disk, fewer multiply-adds).

* Plain: ``W = U Σ Vᵀ``; ``A = Σ_r^½ V_rᵀ``, ``B = U_r Σ_r^½`` (the singular values split evenly, so both
  factors have the same scale). By Eckart–Young this is the best rank-``r`` approximation of ``W``.
* ``activation_weighted`` (in the manner of ASVD, Yuan et al. 2023, https://arxiv.org/abs/2312.05821, and
  SVD-LLM, https://arxiv.org/abs/2403.07378, with a diagonal scaling): the output error that matters is
  ``‖(W − W_r) X‖``, not ``‖W − W_r‖``. With ``s_j = ‖X_j‖₂`` the norm of input feature ``j`` over the
  calibration tokens, truncate the SVD of ``W·diag(s)`` instead and undo the scaling in the first factor:
  ``A = Σ_r^½ V_rᵀ diag(1/s)``. Input features that carry large activations are reconstructed first.

The rank of a linear is ``ceil(rank_ratio · min(out, in))`` or the smallest ``r`` whose top singular values
hold ``energy`` of ``Σσ²`` (of the weighted matrix when activation-weighted). A linear is factored only when
that saves parameters, ``r·(in + out) < in·out``; otherwise it stays dense and the report says so.

Checkpoint format (what :func:`load_hf` and the runtime read): the factored linear ``NAME`` is stored as
``NAME.lowrank_a.weight [r, in]``, ``NAME.lowrank_b.weight [out, r]`` and, if it had one,
``NAME.lowrank_b.bias [out]``; ``config.json`` carries ``"llmctl_lowrank": {NAME: r, ...}`` (full module
names, e.g. ``model.layers.0.mlp.down_proj``). :func:`apply_lowrank` builds that module structure on a
freshly constructed model (a transformers model or llmctl's own ``DecoderLM``, which use the same names) so
the state dict loads as is. Tools other than llmctl do not understand it: ``--materialize`` writes the
dense ``B·A`` instead.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmctl.core.errors import ModelError, UsageError

CONFIG_KEY = "llmctl_lowrank"


class LowRankLinear(nn.Module):
    """``y = B(A x) + bias``: an ``nn.Linear(in, out)`` factored through rank ``r``."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, bias: bool, *, device=None, dtype=None
    ):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.lowrank_a = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lowrank_b = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lowrank_b(self.lowrank_a(x))

    def dense(self) -> nn.Linear:
        """The equivalent ``nn.Linear`` (``W = B·A``), computed in float32."""
        w = self.lowrank_b.weight.detach().float() @ self.lowrank_a.weight.detach().float()
        bias = self.lowrank_b.bias
        lin = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=w.device)
        with torch.no_grad():
            lin.weight.copy_(w)
            if bias is not None:
                lin.bias.copy_(bias.detach().float())
        return lin.to(self.lowrank_a.weight.dtype)


# --- rank choice and factors ----------------------------------------------------------------------------


def check_lowrank_options(rank_ratio: float | None, energy: float | None) -> None:
    if (rank_ratio is None) == (energy is None):
        raise UsageError("--method lowrank needs exactly one of --rank-ratio R or --energy E")
    if rank_ratio is not None and not 0 < rank_ratio <= 1:
        raise UsageError(f"--rank-ratio {rank_ratio}: must be in (0, 1]")
    if energy is not None and not 0 < energy <= 1:
        raise UsageError(f"--energy {energy}: must be in (0, 1]")


def saves_parameters(out_features: int, in_features: int, rank: int) -> bool:
    """Whether two factors of rank ``rank`` hold fewer weights than the dense matrix."""
    return rank * (in_features + out_features) < in_features * out_features


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest ``r`` with ``Σ_{i<r} σ_i² ≥ energy · Σ σ²`` (values sorted descending)."""
    sq = singular_values.double() ** 2
    total = float(sq.sum())
    if total == 0:
        return 1
    cumulative = torch.cumsum(sq, 0) / total
    # a relative tolerance, so energy=1.0 does not ask for the rounding noise of the last values
    return min(int((cumulative < energy - 1e-12).sum()) + 1, len(singular_values))


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    return max(1, math.ceil(ratio * min(out_features, in_features) - 1e-9))


def svd(weight: torch.Tensor, scale: torch.Tensor | None = None):
    """``U, S, Vh`` of ``W·diag(scale)`` (or ``W``). Computed in float32 (the weights' own precision at
    best; float64 is about 3x slower on a CPU), returned in float64 for the factor arithmetic."""
    w = weight.detach().to(torch.float32)
    if scale is not None:
        w = w * scale.to(torch.float32)[None, :]
    return tuple(t.to(torch.float64) for t in torch.linalg.svd(w, full_matrices=False))


def factors(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [r, in], B [out, r])`` with ``B·A`` the rank-``r`` truncation (scaling undone in ``A``)."""
    root = S[:rank].sqrt()
    a = root[:, None] * Vh[:rank]
    if scale is not None:
        a = a / scale.to(torch.float64)[None, :]
    b = U[:, :rank] * root[None, :]
    return a.to(torch.float32), b.to(torch.float32)


def input_scale(norms: torch.Tensor) -> torch.Tensor:
    """``s_j = ‖X_j‖₂``, with features that never fired clamped to a small share of the largest (so
    ``1/s`` stays finite; their columns then barely count in the truncation, which is what they deserve)."""
    norms = norms.to(torch.float64)
    floor = max(float(norms.max()) * 1e-6, 1e-12)
    return norms.clamp(min=floor)


def factorize(
    weight: torch.Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Truncated SVD of one matrix at ``rank`` or ``energy``: ``(A, B, info)``; ``info`` has the rank and
    the share of (weighted) spectral energy it keeps."""
    U, S, Vh = svd(weight, scale)
    full = len(S)
    r = rank_for_energy(S, energy) if energy is not None else min(int(rank or full), full)
    a, b = factors(U, S, Vh, r, scale)
    sq = S**2
    kept = float(sq[:r].sum() / sq.sum()) if float(sq.sum()) > 0 else 1.0
    return a, b, {"rank": r, "energy_kept": kept}


# --- swapping modules -----------------------------------------------------------------------------------


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ModelError(f"low-rank module {name} not found in the model") from None


def apply_lowrank(model: nn.Module, spec: dict[str, int] | None) -> int:
    """Swap each ``nn.Linear`` named in ``spec`` ({full module name: rank}) for an (uninitialised)
    :class:`LowRankLinear` on the same device and dtype, so a factored state dict loads into ``model``.
    Works on transformers models and on ``DecoderLM`` (same module names). Returns how many were swapped."""
    for name, rank in (spec or {}).items():
        old = _submodule(model, name)
        if not isinstance(old, nn.Linear):
            raise ModelError(f"low-rank module {name} is not a linear layer of this model")
        new = LowRankLinear(
            old.in_features, old.out_features, int(rank), old.bias is not None,
            device=old.weight.device, dtype=old.weight.dtype,
        )  # fmt: skip
        model.set_submodule(name, new)
    return len(spec or {})


def materialize(model: nn.Module) -> int:
    """Replace every :class:`LowRankLinear` by its dense ``nn.Linear``; returns how many."""
    names = [name for name, m in model.named_modules() if isinstance(m, LowRankLinear)]
    for name in names:
        model.set_submodule(name, model.get_submodule(name).dense())
    return len(names)


# --- reading a factored checkpoint -----------------------------------------------------------------------


def spec_of(path: Path) -> dict[str, int] | None:
    """The ``llmctl_lowrank`` entry of a model directory's config.json (None for a dense model)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    spec = config.get(CONFIG_KEY)
    return spec if isinstance(spec, dict) and spec else None


def load_hf(path: Path, *, dtype: torch.dtype):
    """A transformers causal LM for a factored checkpoint: built from its config, the linears of
    ``llmctl_lowrank`` swapped for :class:`LowRankLinear`, then the safetensors loaded strictly."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmctl.core.models.hf import read_safetensors

    path = Path(path)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as e:
        raise ModelError(f"cannot build the model in {path}: {e}") from e
    apply_lowrank(model, getattr(config, CONFIG_KEY, None) or spec_of(path))
    state = read_safetensors(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {
        k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)
    }
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ModelError(
            f"weights of {path} do not match its low-rank config: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    if tied:
        model.tie_weights()
    return model.eval()


# --- pruning ---------------------------------------------------------------------------------------------


@torch.no_grad()
def prune_lowrank(
    model,
    *,
    rank_ratio: float | None,
    energy: float | None,
    ids: torch.Tensor | None = None,
    batch_size: int = 8,
    skip: tuple[str, ...] = (),
    progress: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Factor the decoder layers' linears of ``model`` in place; one report row per linear (name, shape,
    rank, whether it was factored, kept energy). With ``ids`` the SVD is activation-weighted, layer by
    layer, each layer calibrated on the outputs of the already-factored ones."""
    from llmctl.core.prune.unstructured import prunable
    from llmctl.core.prune.wanda import InputNorms
    from llmctl.core.quantize.calib import LayerInputs, decoder_layers, linears_of, run_layerwise

    check_lowrank_options(rank_ratio, energy)
    targets = prunable(model, skip)
    if not targets:
        raise UsageError("no linear layers left to factor (check --skip)")
    layers = decoder_layers(model)
    prefix = next(name for name, m in model.named_modules() if m is layers)
    report: list[dict[str, Any]] = []

    def factor_layer(index: int, layer: nn.Module, norms: dict[str, torch.Tensor]) -> None:
        for name, lin in linears_of(layer, skip).items():
            full = f"{prefix}.{index}.{name}"
            out_f, in_f = lin.weight.shape
            scale = input_scale(norms[name]) if name in norms else None
            rank = rank_for_ratio(out_f, in_f, rank_ratio) if rank_ratio is not None else None
            a, b, info = factorize(lin.weight, rank=rank, energy=energy, scale=scale)
            row = {"name": full, "shape": [out_f, in_f], **info}
            row["factored"] = saves_parameters(out_f, in_f, info["rank"])
            if row["factored"]:
                new = LowRankLinear(in_f, out_f, info["rank"], lin.bias is not None,
                                    device=lin.weight.device, dtype=lin.weight.dtype)  # fmt: skip
                new.lowrank_a.weight.copy_(a)
                new.lowrank_b.weight.copy_(b)
                if lin.bias is not None:
                    new.lowrank_b.bias.copy_(lin.bias)
                layer.set_submodule(name, new)
            row["parameters"] = info["rank"] * (in_f + out_f) if row["factored"] else in_f * out_f
            report.append(row)

    if ids is None:
        for index, layer in enumerate(layers):
            factor_layer(index, layer, {})
            if progress:
                progress()
        return report

    def on_layer(index: int, layer: nn.Module, inputs: LayerInputs) -> None:
        lins = linears_of(layer, skip)
        stats = {name: InputNorms(lin.in_features) for name, lin in lins.items()}
        inputs.collect(layer, lins, lambda name, x: stats[name].add(x))
        factor_layer(index, layer, {name: s.norms for name, s in stats.items()})
        if progress:
            progress()

    run_layerwise(model, ids, on_layer, batch_size=batch_size)
    return report


def lowrank_spec(model) -> dict[str, int]:
    """``{full module name: rank}`` of the model's :class:`LowRankLinear` modules."""
    return {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
