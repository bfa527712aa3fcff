"""``llmctl inspect``: what a model is, read from its headers, without loading its weights.

For a Hugging Face directory the parameter counts come from the safetensors headers (shapes only); for
a GGUF file from its tensor table. Tied embeddings are stored once, so the count equals
``sum(p.numel() for p in model.parameters())`` of the loaded model.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from llmctl.core.errors import ModelError
from llmctl.core.models.hf import ModelRef, load_tokenizer, resolve_model

# Module type of a tensor, by a fragment of its name (Hugging Face names first, then GGUF's).
# Norms come before attention: "post_attention_layernorm" and GGUF's "attn_norm" are norms.
MODULE_TYPES = [
    ("embedding", ("embed_tokens", "wte", "word_embeddings", "token_embd")),
    ("lm_head", ("lm_head",)),
    ("norm", ("norm", "ln_")),
    ("attention", ("self_attn", "attention", "attn_")),
    ("mlp", ("mlp", "feed_forward", "ffn_")),
]


def module_type(name: str) -> str:
    if name == "output.weight":  # GGUF's untied output projection
        return "lm_head"
    for kind, fragments in MODULE_TYPES:
        if any(f in name for f in fragments):
            return kind
    return "other"


def _size_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def inspect_model(path: str | Path) -> dict[str, Any]:
    ref = resolve_model(path)
    info = _inspect_gguf(ref) if ref.kind == "gguf" else _inspect_hf(ref)
    info["size_on_disk_bytes"] = _size_on_disk(ref.path)
    return info


# -- Hugging Face directories ------------------------------------------------------------------------------
def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    return sorted(directory.glob("*.safetensors"))


def _inspect_hf(ref: ModelRef) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        config = json.loads((ref.path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {ref.path / 'config.json'}: {e}") from e
    files = _safetensors_files(ref.path)
    if not files:
        raise ModelError(f"{ref.path} has no .safetensors weights (llmctl reads safetensors only)")
    by_module: Counter[str] = Counter()
    dtypes: Counter[str] = Counter()
    tensors = 0
    for file in files:
        try:
            with safe_open(str(file), "pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    tensor = f.get_slice(name)
                    numel = 1
                    for dim in tensor.get_shape():
                        numel *= dim
                    by_module[module_type(name)] += numel
                    dtypes[str(tensor.get_dtype())] += numel
                    tensors += 1
        except Exception as e:
            raise ModelError(f"cannot read safetensors file {file}: {e}") from e
    text = config.get("text_config", config)
    info: dict[str, Any] = {
        "path": str(ref.path),
        "format": "huggingface",
        "architecture": (config.get("architectures") or [None])[0],
        "model_type": config.get("model_type"),
        "parameters": sum(by_module.values()),
        "parameters_by_module": dict(sorted(by_module.items())),
        "tensors": tensors,
        "dtype": config.get("dtype") or config.get("torch_dtype"),
        "stored_dtypes": dict(dtypes.most_common()),
        "layers": text.get("num_hidden_layers"),
        "hidden_size": text.get("hidden_size"),
        "attention_heads": text.get("num_attention_heads"),
        "kv_heads": text.get("num_key_value_heads", text.get("num_attention_heads")),
        "vocab_size": text.get("vocab_size"),
        "context_length": text.get("max_position_embeddings"),
        "tie_word_embeddings": config.get("tie_word_embeddings", False),
        "shards": len(files),
        "quantization": config.get("quantization_config"),
    }
    info["tokenizer"] = _tokenizer_summary(ref)
    return info


def _tokenizer_summary(ref: ModelRef) -> dict[str, Any] | None:
    if not any(
        (ref.path / n).exists() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    ):
        return None
    try:
        tok = load_tokenizer(ref)
    except ModelError as e:
        return {"error": str(e)}
    template = getattr(tok, "chat_template", None)
    return {
        "class": type(tok).__name__,
        "vocab_size": len(tok),
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
        "unk_token": tok.unk_token,
        "model_max_length": tok.model_max_length if tok.model_max_length < 10**9 else None,
        "chat_template": _template_summary(template if isinstance(template, str) else None),
    }


def _template_summary(template: str | None) -> dict[str, Any] | None:
    if not template:
        return None
    style = "chatml" if "<|im_start|>" in template else "other"
    return {"style": style, "chars": len(template), "preview": " ".join(template.split())[:100]}


# -- GGUF files --------------------------------------------------------------------------------------------
def _gguf_value(reader, key: str) -> Any:
    field = reader.get_field(key)
    if field is None:
        return None
    try:
        return field.contents()
    except Exception:  # older gguf versions: decode by hand
        value = field.parts[field.data[0]]
        return bytes(value).decode("utf-8") if value.dtype.kind == "u" and len(value) > 1 else value.tolist()


def _inspect_gguf(ref: ModelRef) -> dict[str, Any]:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(ref.path))
    except Exception as e:
        raise ModelError(f"cannot read GGUF file {ref.path}: {e}") from e
    arch = _gguf_value(reader, "general.architecture")
    by_module: Counter[str] = Counter()
    qtypes: Counter[str] = Counter()
    for t in reader.tensors:
        n = int(t.n_elements)
        by_module[module_type(t.name)] += n
        qtypes[t.tensor_type.name] += n

    def arch_key(name: str) -> Any:
        return _gguf_value(reader, f"{arch}.{name}")

    tokens = _gguf_value(reader, "tokenizer.ggml.tokens")
    template = _gguf_value(reader, "tokenizer.chat_template")

    def token(key: str) -> str | None:
        idx = _gguf_value(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[idx] if tokens is not None and idx is not None and idx < len(tokens) else None

    heads = arch_key("attention.head_count")
    return {
        "path": str(ref.path),
        "format": "gguf",
        "architecture": arch,
        "name": _gguf_value(reader, "general.name"),
        "parameters": sum(by_module.values()),
        "parameters_by_module": dict(sorted(by_module.items())),
        "tensors": len(reader.tensors),
        "stored_dtypes": dict(qtypes.most_common()),
        "layers": arch_key("block_count"),
        "hidden_size": arch_key("embedding_length"),
        "attention_heads": heads,
        "kv_heads": arch_key("attention.head_count_kv") or heads,
        "vocab_size": len(tokens) if tokens is not None else arch_key("vocab_size"),
        "context_length": arch_key("context_length"),
        "quantization": {"file_type": _gguf_value(reader, "general.file_type"), "tensor_types": dict(qtypes)},
        "tokenizer": None
        if tokens is None
        else {
            "model": _gguf_value(reader, "tokenizer.ggml.model"),
            "vocab_size": len(tokens),
            "bos_token": token("bos"),
            "eos_token": token("eos"),
            "pad_token": token("padding"),
            "unk_token": token("unknown"),
            "chat_template": _template_summary(template),
        },
    }


def render_table(info: dict[str, Any]):
    """A rich table of ``info`` for people at a terminal."""
    from rich.table import Table

    table = Table(title=str(info.get("path")), show_header=False, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value")

    def fmt(value: Any) -> str:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
            return f"{value:,}"
        if isinstance(value, dict):
            return ", ".join(f"{k}: {fmt(v)}" for k, v in value.items())
        return "-" if value is None else str(value)

    size = info.get("size_on_disk_bytes") or 0
    for key, value in info.items():
        if key in ("path", "tokenizer", "size_on_disk_bytes"):
            continue
        table.add_row(key.replace("_", " "), fmt(value))
    table.add_row("size on disk", f"{size / 2**20:,.1f} MiB")
    tok = info.get("tokenizer")
    if tok:
        for key, value in tok.items():
            if key == "chat_template" and isinstance(value, dict):
                value = f"{value['style']} ({value['chars']} chars): {value['preview']}"
            table.add_row(f"tokenizer {key.replace('_', ' ')}", fmt(value))
    return table
