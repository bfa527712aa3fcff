"""Export a local Hugging Face causal LM directory to a GGUF file that llama.cpp loads.

The export reads ``config.json``, the safetensors weights (one file, or shards listed in
``model.safetensors.index.json``), ``tokenizer.json`` / ``tokenizer_config.json``, and optionally
``generation_config.json`` and ``chat_template.jinja``; it writes one GGUF file with the model's
hyperparameters, its tokenizer and its tensors.

References for the format and the conventions followed here:

* GGUF layout (header, key/value metadata, tensor infos, aligned data):
  https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
* Key names, tensor names, token types, file types and quantization block sizes: the ``gguf``
  package (``gguf.constants.Keys``, ``gguf.MODEL_ARCH``, ``gguf.get_tensor_name_map``,
  ``gguf.TokenType``, ``gguf.LlamaFileType``, ``gguf.quants``).
* llama.cpp conventions: ``src/llama-vocab.cpp`` (the accepted ``tokenizer.ggml.pre`` names and
  their split regexes), ``src/llama-model.cpp`` (``output.weight`` is optional: when absent the
  token embedding is reused, i.e. the embeddings are tied), ``src/llama-arch.cpp`` (tensor names).
* Rotary layout: llama.cpp runs the ``llama`` architecture with "normal" RoPE, which rotates
  adjacent pairs (0,1), (2,3), ... of each head, while Hugging Face Llama checkpoints rotate
  pairs (i, i + head_dim/2) ("rotate half"). The q/k projection rows are therefore permuted on
  export; ``qwen2`` runs with NeoX RoPE (rotate half) in llama.cpp and needs no permutation.

Tensors are read one at a time with ``safetensors.safe_open`` and written straight to the file,
so peak memory is about one tensor (in float32) rather than the whole model.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import safe_open

from llmctl.core.errors import ModelError, UsageError

__all__ = ["OUTTYPES", "SUPPORTED_ARCHITECTURES", "export_gguf"]

# Hugging Face `architectures[0]` -> GGUF architecture. Mistral is Llama with a different name as far
# as llama.cpp is concerned (its sliding window is not used by llama.cpp's llama graph either).
SUPPORTED_ARCHITECTURES: dict[str, gguf.MODEL_ARCH] = {
    "LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "MistralForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2,
}

_Q = gguf.GGMLQuantizationType
# outtype -> (type of 2-D weight matrices, general.file_type)
OUTTYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (_Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (_Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (_Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

# Source dtypes we can read; anything else (int8, fp8, packed 4-bit...) is already quantized by some
# other scheme and cannot be exported faithfully from here.
_FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}

# Tensors in checkpoints that are not model parameters (older transformers saved the RoPE cache).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

# Split regexes of byte-level BPE pre-tokenizers -> llama.cpp's name for the same pre-tokenizer.
# The names are the ones llama.cpp's llama-vocab.cpp accepts; transformers' GGUF reader maps them back
# to the same regex (integrations/gguf/gguf_tokenizer_mapping.py: GGUF_PRE_TOKENIZER_SPLITS).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_REGEX_PRE = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}

ProgressCallback = Callable[[int, int], None]


# --------------------------------------------------------------------------------------------------
# small helpers


def _read_json(path: Path, what: str, *, required: bool = True) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise ModelError(f"{what} is missing: no {path.name} in {path.parent}")
        return None
    try:
        with path.open(encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {what} {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"cannot read {what} {path}: expected a JSON object")
    return data


def _config_int(config: dict[str, Any], key: str, config_path: Path, default: int | None = None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelError(f"{config_path}: '{key}' is missing or not an integer (got {value!r})")
    return value


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, an AddedToken dict, or null."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


# --------------------------------------------------------------------------------------------------
# hyperparameters


@dataclass(frozen=True)
class _HParams:
    hf_arch: str
    arch: gguf.MODEL_ARCH
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # None for plain RoPE
    rms_eps: float
    vocab_size: int
    tied: bool


def _read_hparams(config: dict[str, Any], config_path: Path) -> _HParams:
    archs = config.get("architectures") or []
    hf_arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    if hf_arch not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise ModelError(
            f"architecture {hf_arch or config.get('model_type') or 'unknown'} is not supported for GGUF "
            f"export; supported: {supported}"
        )

    n_embd = _config_int(config, "hidden_size", config_path)
    n_head = _config_int(config, "num_attention_heads", config_path)
    n_head_kv = _config_int(config, "num_key_value_heads", config_path, default=n_head)
    head_dim = config.get("head_dim") or n_embd // n_head
    if head_dim % 2:
        raise ModelError(f"{config_path}: head_dim {head_dim} is odd; RoPE needs an even head size")

    # transformers >= 5 keeps RoPE settings in `rope_parameters` (theta included); 4.x used
    # `rope_theta` plus an optional `rope_scaling` dict.
    rope_params = config.get("rope_parameters")
    rope_params = rope_params if isinstance(rope_params, dict) else {}
    theta = rope_params.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") if isinstance(config.get("rope_scaling"), dict) else rope_params
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise ModelError(
            f"{config_path}: RoPE scaling type {rope_type!r} is not supported for GGUF export "
            "(supported: none, linear, llama3)"
        )

    if hf_arch == "Qwen2ForCausalLM" and config.get("use_sliding_window"):
        # llama.cpp's qwen2 graph attends over the full context; exporting would silently change the model.
        raise ModelError(
            f"{config_path}: Qwen2 with use_sliding_window=true is not supported for GGUF export"
        )

    eps = config.get("rms_norm_eps", 1e-6)
    # Llama's and Qwen2's config classes default to untied embeddings when the key is absent.
    tied = bool(config.get("tie_word_embeddings", False))
    return _HParams(
        hf_arch=hf_arch,
        arch=SUPPORTED_ARCHITECTURES[hf_arch],
        n_layer=_config_int(config, "num_hidden_layers", config_path),
        n_embd=n_embd,
        n_ff=_config_int(config, "intermediate_size", config_path),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=int(head_dim),
        n_ctx=_config_int(config, "max_position_embeddings", config_path),
        rope_theta=float(theta),
        rope_scaling=None if rope_type == "default" else dict(scaling, rope_type=rope_type),
        rms_eps=float(eps),
        vocab_size=_config_int(config, "vocab_size", config_path),
        tied=tied,
    )


def _llama3_rope_factors(hp: _HParams) -> np.ndarray:
    """Per-frequency divisors for Llama-3.1-style RoPE scaling, as llama.cpp's `rope_freqs.weight`.

    llama.cpp divides each base frequency by the factor stored here, which reproduces the
    transformers "llama3" rope_type: high frequencies untouched, low ones divided by `factor`, and a
    smooth blend between the two wavelength thresholds.
    """
    s = hp.rope_scaling or {}
    factor = float(s.get("factor", 8.0))
    low = float(s.get("low_freq_factor", 1.0))
    high = float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s.get("original_max_position_embeddings", hp.n_ctx))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high

    freqs = 1.0 / (hp.rope_theta ** (np.arange(0, hp.head_dim, 2, dtype=np.float64) / hp.head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# tensors


@dataclass
class _TensorJob:
    """One tensor of the output file, and where its data comes from."""

    gguf_name: str
    shape: tuple[int, ...]  # numpy (row-major) order, as in the checkpoint
    qtype: gguf.GGMLQuantizationType
    shard: Path | None = None  # source shard; None for tensors computed here (rope_freqs)
    hf_name: str | None = None
    permute_heads: int | None = None  # llama q/k: number of heads to permute over
    data: np.ndarray | None = None  # precomputed data (rope_freqs)

    @property
    def nbytes(self) -> int:
        return math.prod(self.byte_shape)

    @property
    def byte_shape(self) -> tuple[int, ...]:
        if self.qtype == _Q.F32:
            return (*self.shape[:-1], self.shape[-1] * 4)
        if self.qtype == _Q.F16:
            return (*self.shape[:-1], self.shape[-1] * 2)
        return gguf.quants.quant_shape_to_byte_shape(self.shape, self.qtype)


def _weight_shards(model_dir: Path) -> list[Path]:
    index_path = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index_path.is_file():
        index = _read_json(index_path, "safetensors index")
        weight_map = index.get("weight_map") if index else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"cannot read safetensors index {index_path}: no 'weight_map'")
        shards = [model_dir / name for name in dict.fromkeys(weight_map.values())]
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise ModelError(
                f"weight shards listed in {index_path.name} are missing from {model_dir}: {missing}"
            )
        return shards
    if single.is_file():
        return [single]
    hint = (
        " (found PyTorch .bin weights; re-save them as safetensors)" if any(model_dir.glob("*.bin")) else ""
    )
    raise ModelError(
        f"weights are missing: no model.safetensors or model.safetensors.index.json in {model_dir}{hint}"
    )


def _choose_qtype(
    shape: tuple[int, ...], weight_type: gguf.GGMLQuantizationType
) -> gguf.GGMLQuantizationType:
    # Norms, biases and RoPE factors are 1-D, tiny and precision-sensitive: llama.cpp keeps them f32.
    if len(shape) < 2 or weight_type == _Q.F32:
        return _Q.F32
    if weight_type == _Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[_Q.Q8_0][0] != 0:
        # Q8_0 quantizes each row in whole blocks of 32; a row that does not divide falls back to f16.
        return _Q.F16
    return weight_type


def _plan_tensors(
    hp: _HParams, shards: list[Path], weight_type: gguf.GGMLQuantizationType
) -> tuple[list[_TensorJob], int]:
    """Map every checkpoint tensor to its GGUF name and type; returns the jobs and the parameter count."""
    name_map = gguf.get_tensor_name_map(hp.arch, hp.n_layer)
    jobs: list[_TensorJob] = []
    seen: dict[str, str] = {}
    n_params = 0
    has_output = False
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as fh:
                names = list(fh.keys())
                infos = {n: (tuple(fh.get_slice(n).get_shape()), fh.get_slice(n).get_dtype()) for n in names}
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise ModelError(f"cannot read weights {shard}: {exc}") from exc
        for hf_name in names:
            shape, dtype = infos[hf_name]
            if hf_name.endswith(_IGNORED_SUFFIXES):
                continue
            if hf_name == "lm_head.weight" and hp.tied:
                # Tied checkpoints sometimes still store the head; llama.cpp reuses token_embd when
                # output.weight is absent, which is exactly "tied".
                continue
            gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ModelError(
                    f"{shard}: tensor {hf_name!r} has no GGUF equivalent in {gguf.MODEL_ARCH_NAMES[hp.arch]}"
                )
            if dtype not in _FLOAT_DTYPES:
                raise ModelError(
                    f"{shard}: tensor {hf_name!r} has dtype {dtype}; only float weights can be exported"
                )
            if gguf_name in seen:
                raise ModelError(
                    f"tensors {seen[gguf_name]!r} and {hf_name!r} both map to GGUF {gguf_name!r}"
                )
            seen[gguf_name] = hf_name
            has_output |= gguf_name == "output.weight"

            permute_heads = None
            if hp.arch == gguf.MODEL_ARCH.LLAMA:
                if gguf_name.endswith((".attn_q.weight", ".attn_q.bias")):
                    permute_heads = hp.n_head
                elif gguf_name.endswith((".attn_k.weight", ".attn_k.bias")):
                    permute_heads = hp.n_head_kv
            if permute_heads is not None and shape[0] != permute_heads * hp.head_dim:
                raise ModelError(
                    f"{hf_name} has {shape[0]} rows; config.json says {permute_heads} heads x {hp.head_dim}"
                )
            if gguf_name == "token_embd.weight" and shape[0] != hp.vocab_size:
                raise ModelError(
                    f"{hf_name} has {shape[0]} rows but config.json says vocab_size={hp.vocab_size}"
                )
            jobs.append(
                _TensorJob(
                    gguf_name=gguf_name,
                    shape=shape,
                    qtype=_choose_qtype(shape, weight_type),
                    shard=shard,
                    hf_name=hf_name,
                    permute_heads=permute_heads,
                )
            )
            n_params += math.prod(shape)

    if "token_embd.weight" not in seen:
        raise ModelError(
            f"no token embedding (model.embed_tokens.weight) in the weights of {shards[0].parent}"
        )
    if not hp.tied and not has_output:
        raise ModelError(
            f"config.json says tie_word_embeddings=false but there is no lm_head.weight in {shards[0].parent}"
        )
    if hp.rope_scaling and hp.rope_scaling["rope_type"] == "llama3":
        factors = _llama3_rope_factors(hp)
        jobs.append(_TensorJob("rope_freqs.weight", factors.shape, _Q.F32, data=factors))
    return jobs, n_params


def _permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from HF "rotate half" to llama.cpp's adjacent-pair RoPE layout.

    Within one head HF rotates row i together with row i + head_dim/2; llama.cpp's llama graph
    rotates rows 2i and 2i+1. Interleaving the two halves makes the pairs adjacent:

        (n_heads * head_dim, n_in) -> (n_heads, 2, head_dim/2, n_in)   # [half][i]
                                   -> (n_heads, head_dim/2, 2, n_in)   # [i][half]
                                   -> (n_heads * head_dim, n_in)

    Works for 1-D biases too (n_in absent). transformers' GGUF reader applies the inverse on load.
    """
    shape = w.shape
    head_dim = shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _encode(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == _Q.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == _Q.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    # Q8_0: per block of 32 values, one f16 scale (max|x|/127) and 32 int8s -> uint8 rows of 34-byte blocks.
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


def _encoded_tensors(jobs: list[_TensorJob]) -> Iterator[np.ndarray]:
    """Yield each job's data in output order, reading one tensor at a time and one shard open at a time."""
    for shard, group in itertools.groupby(jobs, key=lambda job: job.shard):
        if shard is None:
            for job in group:
                assert job.data is not None
                yield _encode(job.data, job.qtype)
            continue
        try:
            handle = safe_open(str(shard), framework="pt")
        except Exception as exc:  # safetensors raises its own error types
            raise ModelError(f"cannot read weights {shard}: {exc}") from exc
        with handle as fh:
            for job in group:
                try:
                    # float32 first: numpy has no bfloat16, and bf16/f16 -> f32 is exact.
                    tensor = fh.get_tensor(job.hf_name).to(torch.float32)
                except Exception as exc:
                    raise ModelError(f"cannot read tensor {job.hf_name} from {shard}: {exc}") from exc
                if job.permute_heads is not None:
                    tensor = _permute_rotary(tensor, job.permute_heads)
                yield _encode(tensor.numpy(), job.qtype)


# --------------------------------------------------------------------------------------------------
# tokenizer


@dataclass
class _Vocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int]  # "bos"/"eos"/"unk"/"pad" -> id
    add_bos: bool
    add_eos: bool
    chat_template: str | list[dict[str, str]] | None


def _flatten_pre_tokenizer(node: Any) -> list[dict[str, Any]]:
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        return [step for child in node.get("pretokenizers", []) for step in _flatten_pre_tokenizer(child)]
    return [node]


def _detect_pre(pre_tokenizer: Any, path: Path) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for this byte-level pre-tokenizer.

    llama.cpp rejects names it does not know and transformers' GGUF reader rebuilds the split regex
    from the name, so a wrong guess silently changes tokenization; unknown ones are refused instead.
    """
    steps = _flatten_pre_tokenizer(pre_tokenizer)
    kinds = [step.get("type") for step in steps]
    if kinds and kinds[-1] == "ByteLevel" and not steps[-1].get("add_prefix_space", False):
        byte_level_regex = steps[-1].get("use_regex", True)
        if kinds == ["ByteLevel"] and byte_level_regex:
            return "gpt-2"  # the GPT-2 regex built into ByteLevel
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level_regex:
            # SmolLM/SmolLM2: single digits, then the GPT-2 regex. llama.cpp reproduces it exactly;
            # transformers' GGUF reader (5.x) has no regex for "smollm" and uses GPT-2's, so it differs
            # only where a run of spaces precedes a digit.
            return "smollm"
        if kinds == ["Split", "ByteLevel"] and not byte_level_regex:
            pattern = (steps[0].get("pattern") or {}).get("Regex")
            if pattern in _SPLIT_REGEX_PRE and steps[0].get("behavior", "Isolated") == "Isolated":
                return _SPLIT_REGEX_PRE[pattern]
    raise ModelError(
        f"{path}: the byte-level pre-tokenizer {json.dumps(pre_tokenizer)[:200]} is not one llama.cpp knows; "
        "supported: GPT-2 (ByteLevel), SmolLM (Digits + ByteLevel), Llama-3 and Qwen2 split regexes"
    )


def _template_adds(post_processor: Any, token: str | None, position: int) -> bool | None:
    """Whether a TemplateProcessing post-processor puts `token` first (0) / last (-1) of a single sequence."""
    if not isinstance(post_processor, dict) or token is None:
        return None
    if post_processor.get("type") == "Sequence":
        results = [_template_adds(p, token, position) for p in post_processor.get("processors", [])]
        return next((r for r in results if r is not None), None)
    if post_processor.get("type") != "TemplateProcessing":
        return None
    single = post_processor.get("single") or []
    if not single:
        return False
    item = single[position]
    return isinstance(item, dict) and (item.get("SpecialToken") or {}).get("id") == token


def _read_vocab(
    model_dir: Path, config: dict[str, Any], gen_config: dict[str, Any], vocab_size: int
) -> _Vocab:
    tok_path = model_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise ModelError(
            f"tokenizer is missing: no tokenizer.json in {model_dir} (GGUF export needs the fast tokenizer)"
        )
    tok = _read_json(tok_path, "tokenizer")
    tok_config = _read_json(model_dir / "tokenizer_config.json", "tokenizer config", required=False) or {}

    model = tok.get("model") or {}
    model_type = model.get("type")
    if (
        model_type != "BPE"
        or model.get("byte_fallback")
        or not any(
            step.get("type") == "ByteLevel" for step in _flatten_pre_tokenizer(tok.get("pre_tokenizer"))
        )
    ):
        kinds = {step.get("type") for step in _flatten_pre_tokenizer(tok.get("pre_tokenizer"))}
        if model_type == "Unigram" or model.get("byte_fallback") or "Metaspace" in kinds:
            kind = "SentencePiece-style (Unigram, or BPE with byte_fallback/Metaspace)"
        else:
            kind = f"{model_type or 'unknown'} (not byte-level)"
        raise ModelError(
            f"{tok_path}: {kind} tokenizers are not supported for GGUF export yet; "
            "only byte-level BPE tokenizers (GPT-2, Llama-3, Qwen2, SmolLM style) are"
        )
    pre = _detect_pre(tok.get("pre_tokenizer"), tok_path)

    try:
        id_to_token: dict[int, str] = {int(i): str(t) for t, i in (model.get("vocab") or {}).items()}
        types: dict[int, int] = dict.fromkeys(id_to_token, gguf.TokenType.NORMAL)
        for added in tok.get("added_tokens") or []:
            # Added tokens are stored as their plain text, not byte-level spelled: llama.cpp matches them
            # in the raw input before BPE. Special ones are CONTROL (never produced from ordinary text by
            # llama.cpp unless asked to parse specials), the others USER_DEFINED.
            idx, content = int(added["id"]), str(added["content"])
            id_to_token[idx] = content
            types[idx] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"cannot read tokenizer {tok_path}: malformed vocabulary ({exc!r})") from exc

    n_tokens = max(id_to_token) + 1 if id_to_token else 0
    if n_tokens > vocab_size:
        raise ModelError(f"{tok_path} has {n_tokens} tokens but the model's vocab_size is {vocab_size}")
    tokens: list[str] = []
    token_types: list[int] = []
    for idx in range(vocab_size):
        if idx in id_to_token:
            tokens.append(id_to_token[idx])
            token_types.append(int(types[idx]))
        else:
            # llama.cpp needs one token per embedding row; padding rows (vocab_size rounded up for
            # speed) get placeholder names that can never match text.
            tokens.append(f"[PAD{idx}]")
            token_types.append(int(gguf.TokenType.UNUSED))

    token_ids = {t: i for i, t in enumerate(tokens)}
    special_ids: dict[str, int] = {}
    for key in ("bos", "eos", "unk", "pad"):
        content = _token_content(tok_config.get(f"{key}_token"))
        idx = token_ids.get(content) if content is not None else None
        if idx is None:
            # Like llama.cpp's converter: fall back to the model's own ids (generation_config.json first:
            # its eos is what generation stops on), so llama.cpp always has an EOS to stop at.
            fallback = gen_config.get(f"{key}_token_id")
            if fallback is None:
                fallback = config.get(f"{key}_token_id")
            if isinstance(fallback, list):
                fallback = fallback[0] if fallback else None
            idx = fallback if isinstance(fallback, int) and 0 <= fallback < vocab_size else None
        if idx is not None:
            special_ids[key] = idx

    post = tok.get("post_processor")
    add_bos = tok_config.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = bool(_template_adds(post, _token_content(tok_config.get("bos_token")), 0))
    add_eos = tok_config.get("add_eos_token")
    if not isinstance(add_eos, bool):
        add_eos = bool(_template_adds(post, _token_content(tok_config.get("eos_token")), -1))

    # transformers >= 4.43 may save the template as its own file; that file wins, as it does on load.
    chat_template: str | list[dict[str, str]] | None = tok_config.get("chat_template")
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        try:
            chat_template = jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelError(f"cannot read chat template {jinja}: {exc}") from exc

    return _Vocab(tokens, token_types, merges, pre, special_ids, add_bos, add_eos, chat_template or None)


# --------------------------------------------------------------------------------------------------
# metadata


class _Writer(gguf.GGUFWriter):
    """GGUFWriter that can also write an empty array.

    The format allows zero-length arrays and llama.cpp requires `tokenizer.ggml.merges` for a "gpt2"
    vocabulary even when there are no merges (a pure byte-level vocabulary), but gguf-py's writer drops
    empty arrays in `add_array` and refuses them when packing.
    """

    def add_empty_array(self, key: str, sub_type: gguf.GGUFValueType) -> None:
        self.add_key_value(key, [], gguf.GGUFValueType.ARRAY, sub_type=sub_type)

    def _pack_val(self, val: Any, vtype: gguf.GGUFValueType, add_vtype: bool, sub_type=None) -> bytes:
        if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            header = self._pack("I", vtype) if add_vtype else b""
            return header + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _write_metadata(
    writer: _Writer,
    name: str,
    hp: _HParams,
    vocab: _Vocab,
    file_type: gguf.LlamaFileType,
    gen_config: dict[str, Any],
) -> None:
    writer.add_name(name)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_vocab_size(hp.vocab_size)
    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_block_count(hp.n_layer)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    if hp.head_dim != hp.n_embd // hp.n_head:
        # llama.cpp derives the head size from n_embd / n_head unless told otherwise.
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    writer.add_rope_dimension_count(hp.head_dim)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    if hp.rope_scaling and hp.rope_scaling["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(hp.rope_scaling.get("factor", 1.0)))

    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    else:
        writer.add_empty_array(gguf.Keys.Tokenizer.MERGES, gguf.GGUFValueType.STRING)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for key, idx in vocab.special_ids.items():
        adders[key](idx)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)

    # Sampling defaults recorded by the model author; recent llama.cpp uses general.sampling.* as defaults.
    if gen_config.get("do_sample"):
        if isinstance(gen_config.get("temperature"), int | float):
            writer.add_sampling_temp(float(gen_config["temperature"]))
        if isinstance(gen_config.get("top_p"), int | float):
            writer.add_sampling_top_p(float(gen_config["top_p"]))
        if isinstance(gen_config.get("top_k"), int) and gen_config["top_k"] > 0:
            writer.add_sampling_top_k(gen_config["top_k"])


# --------------------------------------------------------------------------------------------------
# entry point


def export_gguf(
    model_dir: str | Path,
    out_path: str | Path,
    outtype: str = "f16",
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Export the Hugging Face causal LM in ``model_dir`` to the GGUF file ``out_path``.

    ``outtype`` is ``"f32"``, ``"f16"`` or ``"q8_0"``: the type of the 2-D weight matrices (1-D
    tensors -- norms, biases -- always stay f32). ``progress(done, total)``, if given, is called once
    before the first tensor and after each tensor written.

    Everything is validated before ``out_path`` is opened, so a ModelError/UsageError leaves no file.
    Returns ``{"architecture", "outtype", "tensors", "parameters", "path", "bytes"}``.
    """
    if outtype not in OUTTYPES:
        raise UsageError(f"unsupported GGUF outtype {outtype!r}; choose one of: {', '.join(OUTTYPES)}")
    weight_type, file_type = OUTTYPES[outtype]

    model_dir = Path(model_dir)
    out_path = Path(out_path)
    if not model_dir.is_dir():
        raise ModelError(f"model directory {model_dir} does not exist or is not a directory")
    config_path = model_dir / "config.json"
    config = _read_json(config_path, "model config")
    assert config is not None
    hp = _read_hparams(config, config_path)
    gen_config = _read_json(model_dir / "generation_config.json", "generation config", required=False) or {}
    vocab = _read_vocab(model_dir, config, gen_config, hp.vocab_size)
    jobs, n_params = _plan_tensors(hp, _weight_shards(model_dir), weight_type)

    total = len(jobs)
    if progress is not None:
        progress(0, total)

    writer = _Writer(out_path, gguf.MODEL_ARCH_NAMES[hp.arch])
    try:
        _write_metadata(writer, model_dir.resolve().name, hp, vocab, file_type, gen_config)
        # Tensor infos (name, shape, type, offset) precede all data in the file, so declare every tensor
        # up front and stream the data afterwards in the same order.
        for job in jobs:
            if job.qtype in (_Q.F32, _Q.F16):
                np_dtype = np.float32 if job.qtype == _Q.F32 else np.float16
                writer.add_tensor_info(job.gguf_name, job.shape, np.dtype(np_dtype), job.nbytes)
            else:
                writer.add_tensor_info(
                    job.gguf_name, job.byte_shape, np.dtype(np.uint8), job.nbytes, job.qtype
                )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()

        done = 0
        for data in _encoded_tensors(jobs):
            writer.write_tensor_data(data)
            done += 1
            if progress is not None:
                progress(done, total)
        writer.flush()
    except OSError as exc:
        raise ModelError(f"cannot write GGUF file {out_path}: {exc}") from exc
    finally:
        writer.close()

    return {
        "architecture": gguf.MODEL_ARCH_NAMES[hp.arch],
        "outtype": outtype,
        "tensors": total,
        "parameters": n_params,
        "path": str(out_path),
        "bytes": out_path.stat().st_size,
    }
