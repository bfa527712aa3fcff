"""GGUF → Hugging Face directory: weights dequantized to the chosen dtype, tokenizer, chat template.

transformers' GGUF reader does the dequantization and the tensor/tokenizer mapping (it knows llama,
mistral, qwen2/qwen3 (+MoE), phi3, gemma2/3, falcon, starcoder2, ... ); llmctl adds what a usable
directory also needs: no leftover GGUF ``quantization_config`` (it blocks saving and reloading), a
tokenizer ``model_max_length`` equal to the context length instead of "infinite", a generation config
with the special-token ids, and provenance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmctl.core.errors import ModelError, UsageError
from llmctl.core.models.hf import ModelRef, load_model, load_tokenizer, resolve_model, save_model


def read_gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file (cheap: reads metadata only)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:
        raise ModelError(f"cannot read GGUF file {path}: {e}") from e
    field = reader.get_field("general.architecture")
    if field is None:
        raise ModelError(f"{path} has no general.architecture: not a model GGUF")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def supported_gguf_architectures() -> list[str]:
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return sorted(k for k in GGUF_CONFIG_MAPPING if k not in ("general", "tokenizer"))


def import_gguf(
    source: str | Path, directory: Path, *, dtype: str = "float32", max_shard_size: str = "2GB"
) -> dict[str, Any]:
    """Write the GGUF model ``source`` as a Hugging Face directory into the existing, empty ``directory``."""
    ref = resolve_model(source)
    if ref.kind != "gguf":
        raise UsageError(f"{source} is not a GGUF file (to export a directory to GGUF, pass --to gguf)")
    arch = read_gguf_architecture(ref.path)
    supported = supported_gguf_architectures()
    if arch not in supported:
        raise ModelError(f"GGUF architecture {arch!r} cannot be imported; supported: {', '.join(supported)}")
    model = load_model(ref, device="cpu", dtype="float32" if dtype == "auto" else dtype)
    tokenizer = load_tokenizer(ref)
    _fix_tokenizer_limits(tokenizer, model.config)
    save_model(model, tokenizer, directory, max_shard_size=max_shard_size)
    return {
        "source": str(ref.path),
        "output": str(directory),
        "architecture": arch,
        "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }


def _fix_tokenizer_limits(tokenizer, config) -> None:
    context = getattr(config, "max_position_embeddings", None)
    if context and (getattr(tokenizer, "model_max_length", 0) or 0) > 10**8:
        tokenizer.model_max_length = int(context)


__all__ = ["ModelRef", "import_gguf", "read_gguf_architecture", "supported_gguf_architectures"]
