"""Local Hugging Face model directories (and GGUF files read on the fly): find, load, save.

Never touches a hub: ``HF_HUB_OFFLINE=1`` is set before transformers is imported and every load passes
``local_files_only``. Failures of the underlying libraries become :class:`ModelError` with the path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.core.errors import ModelError

GGUF_MAGIC = b"GGUF"
DEFAULT_MAX_SHARD_SIZE = "2GB"


@dataclass(frozen=True)
class ModelRef:
    """A model argument, checked: a Hugging Face directory (``kind="hf"``) or a GGUF file (``"gguf"``)."""

    path: Path
    kind: str

    @property
    def load_args(self) -> tuple[str, dict[str, Any]]:
        """What ``from_pretrained`` needs: a directory, plus ``gguf_file`` for GGUF."""
        if self.kind == "gguf":
            return str(self.path.parent), {"gguf_file": self.path.name}
        return str(self.path), {}


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def resolve_model(path: str | Path) -> ModelRef:
    """Check that ``path`` is something llmctl can load, with an error that says what is wrong."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"model not found: {path} (expected a Hugging Face model directory or a .gguf file)")
    if p.is_file():
        if _is_gguf(p):
            return ModelRef(p, "gguf")
        raise ModelError(f"{path} is a file but not a GGUF model; pass a model directory or a .gguf file")
    if not (p / "config.json").is_file():
        raise ModelError(f"{path} has no config.json: not a Hugging Face model directory")
    return ModelRef(p, "hf")


def silence_transformers() -> None:
    from llmctl.core.console import _silence_transformers

    _silence_transformers()


def load_config(ref: ModelRef):
    from transformers import AutoConfig

    silence_transformers()
    path, extra = ref.load_args
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, **extra)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError for unreadable configs
        raise ModelError(f"cannot read the model config in {ref.path}: {e}") from e


def load_tokenizer(path: str | Path | ModelRef):
    """The tokenizer of a model directory, a tokenizer-only directory, or a GGUF file."""
    from transformers import AutoTokenizer

    silence_transformers()
    if isinstance(path, ModelRef):
        target, extra = path.load_args
        shown = path.path
    else:
        p = Path(path).expanduser()
        if not p.exists():
            raise ModelError(
                f"tokenizer not found: {path} (expected a model or tokenizer directory or a .gguf)"
            )
        if p.is_file() and _is_gguf(p):
            target, extra = str(p.parent), {"gguf_file": p.name}
        elif p.is_file() and p.name.endswith(".json"):
            target, extra = str(p.parent), {}
        else:
            target, extra = str(p), {}
        shown = p
    try:
        return AutoTokenizer.from_pretrained(target, local_files_only=True, **extra)
    except Exception as e:
        raise ModelError(f"cannot load a tokenizer from {shown}: {e}") from e


def load_model(ref: ModelRef, *, device: str = "auto", dtype: str = "auto"):
    """A causal LM in eval mode on the resolved device and dtype."""
    from transformers import AutoModelForCausalLM

    from llmctl.core.runtime import resolve_device, resolve_dtype

    silence_transformers()
    dev = resolve_device(device)
    model_dtype = None
    if ref.kind == "hf":
        model_dtype = _config_dtype(ref.path)
    torch_dtype = resolve_dtype(dtype, dev, model_dtype)
    path, extra = ref.load_args
    from llmctl.core.quantize.runtime import is_quantized_checkpoint, load_quantized

    if ref.kind == "hf" and is_quantized_checkpoint(ref.path):  # GPTQ/AWQ/compressed-tensors, on llmctl's
        # W4A16 kernel on CUDA (no gptqmodel/autoawq needed); weights dequantized once on the CPU
        model = load_quantized(ref.path, dtype=torch_dtype, device=dev)
        model.to(dev)
        return model.eval()
    # llmctl prune --method lowrank: factored linears (config.json "llmctl_lowrank"); see prune/lowrank.py
    from llmctl.core.prune import lowrank

    if ref.kind == "hf" and lowrank.spec_of(ref.path):
        return lowrank.load_hf(ref.path, dtype=torch_dtype).to(dev).eval()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch_dtype, **extra)
    except Exception as e:
        raise ModelError(f"cannot load the model in {ref.path}: {e}") from e
    if ref.kind == "gguf":
        drop_gguf_quantization(model)
    model.to(dev)
    model.eval()
    return model


def read_safetensors(directory: Path, dtype=None) -> dict:
    """Every tensor of a model directory's safetensors (shard by shard through the index when there is
    one), cast to ``dtype`` when given."""
    from safetensors.torch import load_file

    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    files = (
        sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
        if index.is_file()
        else sorted(directory.glob("*.safetensors"))
    )
    if not files:
        raise ModelError(f"{directory} has no .safetensors weights")
    state = {}
    for file in files:
        try:
            tensors = load_file(str(file))
        except Exception as e:
            raise ModelError(f"cannot read {file}: {e}") from e
        state.update(tensors if dtype is None else {k: v.to(dtype) for k, v in tensors.items()})
    return state


def quant_method(path: Path) -> str | None:
    """``quantization_config.quant_method`` of ``path``'s config.json (None when not quantized)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return (config.get("quantization_config") or {}).get("quant_method")


def _config_dtype(path: Path) -> str | None:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return config.get("dtype") or config.get("torch_dtype")


def drop_gguf_quantization(model) -> None:
    """A model read from GGUF is already dequantized; its ``quantization_config`` only blocks saving."""
    for obj in (model, model.config):
        for attr in ("quantization_config", "hf_quantizer"):
            if hasattr(obj, attr):
                try:
                    delattr(obj, attr)
                except AttributeError:
                    setattr(obj, attr, None)
    model.is_quantized = False


def save_model(model, tokenizer, directory: Path, *, max_shard_size: str = DEFAULT_MAX_SHARD_SIZE) -> None:
    """A standard Hugging Face directory: config, safetensors (sharded with an index when large),
    generation config, tokenizer files and chat template."""
    directory = Path(directory)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and tokenizer is not None:
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(generation_config, name, None) is None and getattr(tokenizer, name, None) is not None:
                setattr(generation_config, name, getattr(tokenizer, name))
    try:
        model.save_pretrained(directory, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
    except OSError as e:
        raise ModelError(f"cannot write the model to {directory}: {e}") from e
