"""Tests for llmctl.core.models.gguf_export: HF -> GGUF -> HF round trips on tiny random models.

The GGUF files are read back with transformers' own GGUF loader (which un-permutes llama q/k and
rebuilds the tokenizer from tokenizer.ggml.*) and with gguf.GGUFReader for the raw metadata.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from llmctl.core.errors import ModelError, UsageError
from llmctl.core.models import gguf_export
from llmctl.core.models.gguf_export import export_gguf

VOCAB = 300  # config vocab; the tokenizers below have fewer tokens, so the export pads (as llama.cpp needs)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!",
    "Hello, world! hello world; HELLO WORLD? It's 2024 and we've got 12345 apples, 678 pears.",
    "def main():\n    return [x * 2 for x in range(10)]  # indented code\n\n\ttabbed line",
    "Unicode: café naïve résumé Ünïcödé — 你好世界，今天天气很好。日本語のテキスト。",
    "Emoji: 😀 😃 🚀 🎉 👍🏽 and mixed   runs    of     spaces\n\n\nand newlines.",
]

ENCODE_STRINGS = [
    "Hello world",
    "The lazy dog's 3 boxes: 12345 + 678 = 13023.",
    "😀🚀 emoji 👍🏽 rocket",
    "你好世界，今天天气很好",
    "   leading, trailing   and    inner  whitespace   ",
    "tabs\tand\nnewlines\n\n\nend",
    "<|im_start|>user\nhi there<|im_end|>\n",
    "Ünïcödé café",
    "room  42 at  7pm",
]

SEQUENCES = torch.tensor(
    [
        [0, 5, 17, 42, 99, 123, 250, 299],
        [1, 2, 3, 4, 5, 6, 7, 8],
        [298, 200, 150, 100, 50, 25, 12, 6],
    ]
)


# --------------------------------------------------------------------------------------------------
# fixtures: tiny tokenizers and models built in temp dirs


def _pre_tokenizer(style: str):
    if style == "gpt-2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    if style == "smollm":
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    regex = {"llama-bpe": gguf_export._LLAMA3_SPLIT, "qwen2": gguf_export._QWEN2_SPLIT}[style]
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _save_tokenizer(directory: Path, style: str) -> None:
    if style == "no-merges":
        # Every byte a token and no merges at all, like llmctl's own untrained byte-level tokenizer.
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        vocab = {token: i for i, token in enumerate(SPECIALS + alphabet)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.add_special_tokens(SPECIALS)
    else:
        tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer("gpt-2" if style == "no-merges" else style)
    tok.decoder = decoders.ByteLevel()
    if style == "llama-bpe":
        # Llama-3 style: the post-processor prepends BOS, and no add_bos_token flag is saved.
        tok.post_processor = processors.TemplateProcessing(
            single="<|im_start|> $A",
            pair="<|im_start|> $A <|im_start|> $B",
            special_tokens=[("<|im_start|>", 1)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if style != "no-merges":
        trainer = trainers.BpeTrainer(
            vocab_size=290,
            special_tokens=SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(TRAIN_TEXT * 3, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    fast.save_pretrained(directory)


def _tiny_config(arch: str, tied: bool):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if arch == "llama":
        return LlamaConfig(**common, rope_theta=500000.0), LlamaForCausalLM
    if arch == "mistral":
        return MistralConfig(**common, rope_theta=10000.0), MistralForCausalLM
    return Qwen2Config(**common, rope_theta=1000000.0), Qwen2ForCausalLM


def _build_model(
    root: Path, arch: str, tied: bool, *, style: str = "gpt-2", dtype=torch.float32, shard: bool = False
) -> Path:
    directory = root / f"{arch}-{'tied' if tied else 'untied'}-{style}-{str(dtype)[6:]}{'-sharded' * shard}"
    config, cls = _tiny_config(arch, tied)
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        # Non-trivial norms and biases, so a misplaced one would change the logits.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.to(dtype).save_pretrained(directory, max_shard_size="100KB" if shard else "5GB")
    _save_tokenizer(directory, style)
    return directory


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf_export")


_EXPORTS: dict[tuple[Path, str], Path] = {}


def _export(model_dir: Path, outtype: str = "f32") -> Path:
    """Export once per (model, outtype) into its own directory (transformers wants dir + file name)."""
    key = (model_dir, outtype)
    if key not in _EXPORTS:
        out_dir = model_dir.parent / f"{model_dir.name}-gguf-{outtype}"
        out_dir.mkdir()
        out = out_dir / "model.gguf"
        summary = export_gguf(model_dir, out, outtype=outtype)
        assert summary["path"] == str(out) and summary["bytes"] == out.stat().st_size
        _EXPORTS[key] = out
    return _EXPORTS[key]


@pytest.fixture(scope="module", params=[("llama", True), ("llama", False)], ids=["tied", "untied"])
def llama_dir(request, root) -> Path:
    arch, tied = request.param
    return _build_model(root, arch, tied)


def _load_gguf_model(path: Path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _logits(model, ids=SEQUENCES) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _fields(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


# --------------------------------------------------------------------------------------------------
# 1. f32 round trip is exact


@pytest.mark.parametrize(
    "arch,tied",
    [("llama", True), ("llama", False), ("qwen2", False), ("qwen2", True), ("mistral", False)],
)
def test_f32_round_trip_gives_identical_logits(root, arch, tied):
    model_dir = _build_model(root, arch, tied)
    original = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = _export(model_dir, "f32")
    loaded = _load_gguf_model(out)
    assert loaded.config.tie_word_embeddings == tied
    assert torch.equal(_logits(original), _logits(loaded))

    _, tensors = _fields(out)
    assert ("output.weight" in tensors) == (not tied)  # llama.cpp ties when output.weight is absent
    if arch == "qwen2":
        assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= tensors.keys()


def test_llama_q_k_rows_are_interleaved_for_llama_cpp(llama_dir):
    """HF rotate-half row i (and i + head_dim/2) must become GGUF rows 2i (and 2i + 1), head by head."""
    out = _export(llama_dir, "f32")
    hf = AutoModelForCausalLM.from_pretrained(llama_dir)
    _, tensors = _fields(out)
    head_dim = 16
    for gguf_name, hf_weight, n_heads in [
        ("blk.0.attn_q.weight", hf.model.layers[0].self_attn.q_proj.weight, 4),
        ("blk.1.attn_k.weight", hf.model.layers[1].self_attn.k_proj.weight, 2),
    ]:
        ours = torch.from_numpy(np.array(tensors[gguf_name].data)).reshape(hf_weight.shape)
        assert not torch.equal(ours, hf_weight)  # the permutation did happen
        for head in range(n_heads):
            base = head * head_dim
            for i in range(head_dim // 2):
                assert torch.equal(ours[base + 2 * i], hf_weight[base + i])
                assert torch.equal(ours[base + 2 * i + 1], hf_weight[base + i + head_dim // 2])


def test_sharded_bf16_checkpoint_round_trip(root):
    # bf16 -> f32 is exact, so the f32 export must match the bf16 model upcast to f32, bit for bit.
    model_dir = _build_model(root, "llama", False, dtype=torch.bfloat16, shard=True)
    assert (model_dir / "model.safetensors.index.json").is_file()
    assert len(list(model_dir.glob("model-*.safetensors"))) > 1
    calls = []
    out = model_dir.parent / "sharded.gguf"
    summary = export_gguf(model_dir, out, outtype="f32", progress=lambda d, t: calls.append((d, t)))
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    assert torch.equal(_logits(original), _logits(loaded))

    n_tensors = 2 * 9 + 3  # per block: 2 norms + q k v o + gate up down; + embed, final norm, head
    assert summary["tensors"] == n_tensors
    assert summary["parameters"] == sum(p.numel() for p in original.parameters())
    assert calls[0] == (0, n_tensors) and calls[-1] == (n_tensors, n_tensors) and len(calls) == n_tensors + 1


# --------------------------------------------------------------------------------------------------
# 2. tokenizer round trip


@pytest.mark.parametrize("style", ["gpt-2", "smollm", "llama-bpe", "qwen2", "no-merges"])
def test_tokenizer_round_trip(root, style):
    model_dir = _build_model(root, "llama", True, style=style)
    out = _export(model_dir, "f32")
    original = AutoTokenizer.from_pretrained(model_dir)
    loaded = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)

    fields, _ = _fields(out)
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == style.replace("no-merges", "gpt-2")
    # llama.cpp requires the merges key for "gpt2" vocabularies, even when it is empty
    assert len(fields["tokenizer.ggml.merges"]) == len(
        json.loads((model_dir / "tokenizer.json").read_text())["model"]["merges"]
    )
    assert fields["tokenizer.ggml.add_bos_token"] is (style == "llama-bpe")

    strings = ENCODE_STRINGS
    if style == "smollm":
        # transformers' GGUF reader has no split regex for "smollm" and falls back to GPT-2's, which
        # does not isolate digits; llama.cpp does. A space run before a digit is where that shows, so
        # those strings are left out here (a transformers limitation, not an export bug).
        strings = [s for s in strings if "  " not in s or not any(c.isdigit() for c in s)]
    for text in strings:
        assert loaded(text)["input_ids"] == original(text)["input_ids"], text
        ids = original(text)["input_ids"]
        assert loaded.decode(ids) == original.decode(ids)
        assert loaded.decode(ids, skip_special_tokens=True) == original.decode(ids, skip_special_tokens=True)

    assert (
        (loaded.bos_token_id, loaded.eos_token_id) == (original.bos_token_id, original.eos_token_id) == (1, 2)
    )
    assert (
        (loaded.pad_token_id, loaded.unk_token_id) == (original.pad_token_id, original.unk_token_id) == (0, 0)
    )
    assert loaded.chat_template == original.chat_template == CHATML
    chat = [{"role": "user", "content": "hi 😀"}, {"role": "assistant", "content": "hello 12"}]
    assert loaded.apply_chat_template(chat, tokenize=False) == original.apply_chat_template(
        chat, tokenize=False
    )


def test_token_types_and_padding(llama_dir):
    out = _export(llama_dir, "f32")
    fields, _ = _fields(out)
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    tok = json.loads((llama_dir / "tokenizer.json").read_text())
    n_real = len(tok["model"]["vocab"])
    assert len(tokens) == len(types) == VOCAB
    assert tokens[:3] == SPECIALS and types[:3] == [gguf.TokenType.CONTROL] * 3
    assert set(types[3:n_real]) == {gguf.TokenType.NORMAL}
    assert tokens[n_real:] == [f"[PAD{i}]" for i in range(n_real, VOCAB)]
    assert set(types[n_real:]) == {gguf.TokenType.UNUSED}
    assert len(fields["tokenizer.ggml.merges"]) == len(tok["model"]["merges"])
    assert fields["tokenizer.ggml.add_bos_token"] is False and fields["tokenizer.ggml.add_eos_token"] is False


# --------------------------------------------------------------------------------------------------
# 3. f16 / q8_0


def test_f16_and_q8_0_close_to_original_and_smaller(llama_dir):
    original = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    reference = _logits(original)
    scale = reference.abs().max().item()
    sizes = {outtype: _export(llama_dir, outtype).stat().st_size for outtype in ("f32", "f16", "q8_0")}
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]

    # Tolerances, relative to the largest logit. f16 keeps 11 significant bits, so each weight moves by
    # at most 2^-11 ~ 5e-4 relative (observed logit error: ~6e-4 of the max). Q8_0 rounds each weight to
    # a step of 1/127 of its 32-value block's max, i.e. up to ~4e-3 of it, and these random weights are
    # close to their block max (observed: ~1.7e-2). Bounds are ~8x and ~3x the observed errors; a
    # layout bug (wrong permutation, misplaced tensor) is caught exactly by the f32 round-trip test.
    for outtype, tolerance in (("f16", 5e-3), ("q8_0", 5e-2)):
        logits = _logits(_load_gguf_model(_export(llama_dir, outtype)))
        error = (logits - reference).abs().max().item()
        assert 0 < error <= tolerance * scale, (outtype, error, scale)

    _, tensors = _fields(_export(llama_dir, "q8_0"))
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    _, tensors = _fields(_export(llama_dir, "f16"))
    assert tensors["blk.1.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.1.ffn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


# --------------------------------------------------------------------------------------------------
# 4. metadata


@pytest.mark.parametrize("outtype,file_type", [("f32", 0), ("f16", 1), ("q8_0", 7)])
def test_metadata_matches_config(llama_dir, outtype, file_type):
    out = _export(llama_dir, outtype)
    fields, tensors = _fields(out)
    config = json.loads((llama_dir / "config.json").read_text())
    assert fields["general.architecture"] == "llama"
    assert fields["general.name"] == llama_dir.name
    assert fields["general.file_type"] == file_type
    assert fields["llama.block_count"] == config["num_hidden_layers"] == 2
    assert fields["llama.context_length"] == config["max_position_embeddings"] == 512
    assert fields["llama.embedding_length"] == 64
    assert fields["llama.feed_forward_length"] == 128
    assert fields["llama.attention.head_count"] == 4
    assert fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.rope.dimension_count"] == 16
    assert fields["llama.rope.freq_base"] == config["rope_parameters"]["rope_theta"] == 500000.0
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5, rel=1e-6)  # stored as f32
    assert fields["llama.vocab_size"] == VOCAB
    assert fields["tokenizer.chat_template"] == CHATML
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert tensors["token_embd.weight"].shape.tolist() == [64, VOCAB]  # ggml order: fastest dim first


def test_llama3_rope_factors_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    config = LlamaConfig(
        hidden_size=128, num_attention_heads=2, max_position_embeddings=4096, rope_parameters=rope
    )
    config_path = Path("config.json")
    hp = gguf_export._read_hparams(config.to_dict() | {"architectures": ["LlamaForCausalLM"]}, config_path)
    factors = gguf_export._llama3_rope_factors(hp)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    plain = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    assert len(set(factors.tolist())) > 2  # the test exercises all three regimes
    np.testing.assert_allclose(factors, (plain / scaled).numpy(), rtol=1e-5)


def test_pre_tokenizer_regexes_match_transformers_reader():
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    for regex, pre in gguf_export._SPLIT_REGEX_PRE.items():
        assert GGUF_PRE_TOKENIZER_SPLITS[pre] == regex


# --------------------------------------------------------------------------------------------------
# 5. errors


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_unsupported_architecture(llama_dir, tmp_path):
    model_dir = _copy(llama_dir, tmp_path / "gptneox")
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (model_dir / "config.json").write_text(json.dumps(config))
    out = tmp_path / "x.gguf"
    with pytest.raises(
        ModelError, match="GPTNeoXForCausalLM is not supported for GGUF export; supported: Llama"
    ):
        export_gguf(model_dir, out)
    assert not out.exists()


def test_bad_outtype(llama_dir, tmp_path):
    with pytest.raises(UsageError, match="q4_k"):
        export_gguf(llama_dir, tmp_path / "x.gguf", outtype="q4_k")


@pytest.mark.parametrize(
    "remove,message",
    [
        ("config.json", "no config.json in"),
        ("model.safetensors", "no model.safetensors or model.safetensors.index.json in"),
        ("tokenizer.json", "no tokenizer.json in"),
    ],
)
def test_missing_files(llama_dir, tmp_path, remove, message):
    model_dir = _copy(llama_dir, tmp_path / "model")
    (model_dir / remove).unlink()
    with pytest.raises(ModelError, match=message) as info:
        export_gguf(model_dir, tmp_path / "x.gguf")
    assert str(model_dir) in str(info.value)
    assert not (tmp_path / "x.gguf").exists()


def test_missing_directory(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        export_gguf(tmp_path / "nope", tmp_path / "x.gguf")


def test_corrupt_config_and_weights(llama_dir, tmp_path):
    model_dir = _copy(llama_dir, tmp_path / "model")
    (model_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="cannot read weights"):
        export_gguf(model_dir, tmp_path / "x.gguf")
    (model_dir / "config.json").write_text("{ not json")
    with pytest.raises(ModelError, match="cannot read model config"):
        export_gguf(model_dir, tmp_path / "x.gguf")


def test_sentencepiece_tokenizer_is_refused(llama_dir, tmp_path):
    model_dir = _copy(llama_dir, tmp_path / "model")
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok["model"]["byte_fallback"] = True
    tok["pre_tokenizer"] = {
        "type": "Metaspace",
        "replacement": "\u2581",
        "prepend_scheme": "first",
        "split": False,
    }
    (model_dir / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ModelError, match="SentencePiece-style"):
        export_gguf(model_dir, tmp_path / "x.gguf")


# --------------------------------------------------------------------------------------------------
# optional: the real consumer. Skipped unless llama-cpp-python is installed (it builds llama.cpp from
# source, so it is not a project dependency).


@pytest.mark.parametrize(
    "arch,tied,style",
    [
        ("llama", True, "gpt-2"),
        ("llama", False, "smollm"),
        ("qwen2", False, "qwen2"),
        ("llama", True, "no-merges"),
    ],
)
def test_llama_cpp_loads_export(root, arch, tied, style):
    llama_cpp = pytest.importorskip("llama_cpp")
    model_dir = _build_model(root, arch, tied, style=style)
    out = _export(model_dir, "f32")
    original = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    for text in ENCODE_STRINGS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
    reference = _logits(original)
    for row, ref in zip(SEQUENCES.tolist(), reference, strict=True):
        llm.reset()
        llm.eval(row)
        got = torch.tensor(np.array(llm.scores[: len(row)]))
        # llama.cpp computes in its own f32 kernels, so not bit-exact (observed ~2.5e-4 of the max
        # logit); skipping the llama q/k permutation gives ~5e-3 on these models.
        assert (got - ref).abs().max() <= 1.5e-3 * ref.abs().max()
    assert llm.metadata["tokenizer.chat_template"] == CHATML
    assert (llm.token_bos(), llm.token_eos()) == (1, 2)
