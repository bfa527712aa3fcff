"""``llmctl init`` presets: small, randomly initialised models with a working tokenizer.

Each preset is a transformers config class plus its sizes. ``llama-tiny`` (2 layers, hidden 64) is what
unit tests use; ``smollm2-135m`` has SmolLM2-135M's exact shapes, for dry runs of real pipelines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmctl.core.errors import UsageError


@dataclass(frozen=True)
class Preset:
    name: str
    model_type: str  # transformers model_type: picks the config class
    description: str
    sizes: dict[str, Any] = field(default_factory=dict)

    def make_config(self, **overrides: Any):
        from transformers import AutoConfig

        return AutoConfig.for_model(self.model_type, **{**self.sizes, **overrides})


_TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.02,
}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("llama-tiny", "llama", "Llama, 2 layers, hidden 64, GQA 4/2 heads, tied embeddings (tests)",
               {**_TINY, "tie_word_embeddings": True}),
        Preset("qwen2-tiny", "qwen2", "Qwen2 (q/k/v biases), 2 layers, hidden 64, GQA 4/2 heads",
               {**_TINY, "tie_word_embeddings": True}),
        Preset("mistral-tiny", "mistral", "Mistral, 2 layers, hidden 64, GQA 4/2 heads, untied lm_head",
               {**_TINY, "tie_word_embeddings": False, "sliding_window": None}),
        Preset("llama-small", "llama", "Llama, 4 layers, hidden 256, GQA 8/4 heads (quick experiments)",
               {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 2048,
                "rms_norm_eps": 1e-5, "tie_word_embeddings": True}),
        Preset("smollm2-135m", "llama", "SmolLM2-135M shapes: 30 layers, hidden 576, GQA 9/3, random init",
               {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
                "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True}),
    ]
}  # fmt: skip


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UsageError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
