"""LoRA adapters merged into their base model, one tensor at a time.

A peft adapter directory holds ``adapter_config.json`` (``r``, ``lora_alpha``, ``use_rslora``,
``fan_in_fan_out``) and ``adapter_model.safetensors`` with, for each adapted linear layer ``M``,
``base_model.model.M.lora_A.weight`` [r, in] and ``...lora_B.weight`` [out, r]. Merging adds

    W_M += sum_k w_k * s_k * B_k @ A_k,      s_k = alpha_k / r_k   (alpha_k / sqrt(r_k) with rsLoRA)

to the base weight (transposed when ``fan_in_fan_out``). With one adapter and w = 1 this is peft's
``merge_and_unload()``; with several it is the exact weighted sum of their updates (peft's
``add_weighted_adapter(..., combination_type="cat")``). https://arxiv.org/abs/2106.09685
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmctl.core.errors import ModelError, UsageError
from llmctl.core.io import atomic_output
from llmctl.core.merge.loader import LazyModel
from llmctl.core.merge.run import NOT_COPIED
from llmctl.core.merge.writer import CODE_DTYPES, ShardedWriter, parse_size
from llmctl.core.provenance import now, write_provenance

PREFIX = "base_model.model."
ADAPTER_FILE = "adapter_model.safetensors"


@dataclass
class Adapter:
    path: Path
    scale: float
    fan_in_fan_out: bool
    pairs: dict[str, tuple[str, str]] = field(default_factory=dict)  # base tensor -> (A key, B key)

    def delta(self, name: str) -> torch.Tensor:
        """The full-rank update of base tensor ``name``: scale * B @ A, [out, in]."""
        from safetensors import safe_open

        a_key, b_key = self.pairs[name]
        with safe_open(str(self.path / ADAPTER_FILE), framework="pt") as f:
            a, b = f.get_tensor(a_key).float(), f.get_tensor(b_key).float()
        delta = (b @ a) * self.scale
        return delta.T if self.fan_in_fan_out else delta


def load_adapter(path: str | Path) -> Adapter:
    from safetensors import safe_open

    path = Path(path).expanduser()
    config_path = path / "adapter_config.json"
    if not config_path.is_file() or not (path / ADAPTER_FILE).is_file():
        raise ModelError(f"{path} is not a LoRA adapter (expected adapter_config.json and {ADAPTER_FILE})")
    config = json.loads(config_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"{path}: only LoRA adapters merge, not {config.get('peft_type')}")
    if config.get("use_dora"):
        raise ModelError(f"{path}: DoRA adapters are not supported yet")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not r or alpha is None:
        raise ModelError(f"{path}/adapter_config.json lacks r or lora_alpha")
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    adapter = Adapter(path, scale, bool(config.get("fan_in_fan_out")))
    with safe_open(str(path / ADAPTER_FILE), framework="pt") as f:
        keys = list(f.keys())
    for key in keys:
        if ".lora_A." not in key:
            if ".lora_B." not in key:
                raise ModelError(
                    f"{path}: tensor {key} is not a LoRA A/B matrix (embedding LoRA, modules_to_save "
                    "and bias are not supported)"
                )
            continue
        module = key.removeprefix(PREFIX).split(".lora_A.")[0]
        b_key = key.replace(".lora_A.", ".lora_B.")
        if b_key not in keys:
            raise ModelError(f"{path}: {key} has no matching lora_B")
        adapter.pairs[f"{module}.weight"] = (key, b_key)
    return adapter


def merge_lora(
    base: str | Path,
    adapters: list[str | Path],
    output: str | Path,
    *,
    weights: list[float] | None = None,
    force: bool = False,
    device: str = "cpu",
    max_shard_size: str = "2GB",
    progress_factory=None,
) -> dict[str, Any]:
    """``base`` with the (weighted) LoRA updates of ``adapters`` added, written to ``output``."""
    from llmctl.core.io.atomic import check_output
    from llmctl.core.runtime import resolve_device

    started = now()
    check_output(output, force=force)
    weights = weights if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise UsageError(f"--weights has {len(weights)} values for {len(adapters)} adapters")
    model = LazyModel(base)
    loaded = [load_adapter(a) for a in adapters]
    for adapter in loaded:
        for name in adapter.pairs:
            if name not in model:
                raise ModelError(f"adapter {adapter.path} targets {name}, which {model.path} does not have")
            shape = model.info(name).shape
            if len(shape) != 2:
                raise ModelError(
                    f"adapter {adapter.path} targets {name} of shape {list(shape)}, not a matrix"
                )
    dev = resolve_device(device)
    names = model.names()
    specs = [(n, model.info(n).shape, CODE_DTYPES[model.info(n).dtype]) for n in names]
    with atomic_output(output, force=force) as tmp:
        writer = ShardedWriter(tmp, specs, parse_size(max_shard_size))
        with writer:
            from contextlib import nullcontext

            bar_cm = progress_factory(len(names)) if progress_factory else nullcontext()
            with bar_cm as bar:
                for name in names:
                    tensor = model.get(name)
                    touched = [(a, w) for a, w in zip(loaded, weights, strict=True) if name in a.pairs]
                    if touched:
                        work = tensor.to(dev, torch.float32)
                        for adapter, w in touched:
                            delta = adapter.delta(name).to(dev)
                            if delta.shape != work.shape:
                                raise ModelError(
                                    f"adapter {adapter.path}: update of {name} is {list(delta.shape)}, "
                                    f"the weight is {list(work.shape)}"
                                )
                            work.add_(delta, alpha=w)
                        tensor = work.to(tensor.dtype)
                    writer.write(name, tensor)
                    if bar is not None:
                        bar.advance()
            writer.finish()
        for f in sorted(model.path.iterdir()):
            if f.is_file() and not f.name.endswith((".safetensors", ".bin")) and f.name not in NOT_COPIED:
                shutil.copy2(f, tmp / f.name)
        write_provenance(
            tmp,
            command="merge",
            inputs=[base, *adapters],
            started_at=started,
            extra={
                "merge": {
                    "method": "lora",
                    "adapters": [str(a) for a in adapters],
                    "weights": weights,
                    "reference": "https://arxiv.org/abs/2106.09685",
                }
            },
        )
    return {
        "output": str(output),
        "method": "lora",
        "models": [str(base)],
        "adapters": [str(a) for a in adapters],
        "tensors": len(names),
        "shards": len(writer.filenames),
        "merged_tensors": len({n for a in loaded for n in a.pairs}),
    }
