"""llmctl tokenize-train: Hugging Face-loadable output, the summary, the input contract and bad input."""

import json
import math

import pytest

from tests.conftest import read_jsonl, run_llmctl, write_jsonl
from tests.core.tokenize.test_train_bpe import synthetic_lines

SAMPLE = "Hello wörld, don't 👋 漢字 2024!  x"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A JSONL corpus (300 records, the text under meta.body) and the same texts as a .txt file."""
    root = tmp_path_factory.mktemp("corpus")
    lines = synthetic_lines(300, seed=11)
    jsonl = write_jsonl(root / "corpus.jsonl", [{"id": i, "meta": {"body": t}} for i, t in enumerate(lines)])
    txt = root / "corpus.txt"
    txt.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"jsonl": jsonl, "txt": txt, "lines": lines}


def test_output_loads_in_tokenizers_and_transformers_and_round_trips(cli, corpus, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    out = tmp_path / "tok"
    result = cli(
        "tokenize-train",
        corpus["jsonl"],
        "--text-field",
        "meta.body",
        "--vocab-size",
        "400",
        "-o",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert {p.name for p in out.iterdir()} >= {
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "llmctl.json"
    }  # fmt: skip
    assert summary["vocab_size"] == 400 and summary["algo"] == "bpe" and summary["engine"] == "hf"
    assert (
        summary["training_records"] == 297
        and summary["eval_records"] == 3
        and summary["eval_on"] == "heldout"
    )
    assert 1.5 < summary["bytes_per_token"] < 10 and summary["tokens_per_word"] > 0.5
    assert summary["unk_rate"] == 0.0 and summary["train_seconds"] >= 0
    rust = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert rust.decode(rust.encode(SAMPLE).ids) == SAMPLE
    hf = AutoTokenizer.from_pretrained(out)
    assert hf.decode(hf(SAMPLE)["input_ids"]) == SAMPLE
    assert hf.eos_token == "<|endoftext|>" and len(hf) == 400
    provenance = json.loads((out / "llmctl.json").read_text())
    assert provenance["command"] == "tokenize-train" and provenance["summary"]["vocab_size"] == 400


@pytest.mark.parametrize("algo", ["bpe", "wordpiece", "unigram"])
def test_each_algorithm_is_deterministic_and_loadable(cli, corpus, tmp_path, algo):
    from transformers import AutoTokenizer

    outs = [tmp_path / f"{algo}{i}" for i in range(2)]
    for out in outs:
        result = cli("tokenize-train", corpus["txt"], "--algo", algo, "--vocab-size", "300", "-o", out, "-q")
        assert result.exit_code == 0, result.stderr
        assert result.stderr == ""
    assert (outs[0] / "tokenizer.json").read_bytes() == (outs[1] / "tokenizer.json").read_bytes()
    tok = AutoTokenizer.from_pretrained(outs[0])
    ids = tok("the lowest newer", add_special_tokens=False)["input_ids"]
    assert ids and tok.unk_token_id not in ids


def test_reference_engine_writes_the_same_bpe_tokenizer_as_hf(cli, corpus, tmp_path):
    for engine in ("hf", "reference"):
        result = cli(
            "tokenize-train",
            corpus["txt"],
            "--engine",
            engine,
            "--vocab-size",
            "350",
            "-o",
            tmp_path / engine,
        )
        assert result.exit_code == 0, result.stderr
    assert (tmp_path / "hf/tokenizer.json").read_bytes() == (
        tmp_path / "reference/tokenizer.json"
    ).read_bytes()


def test_several_corpora_and_stdin_are_read_in_order(cli, corpus, tmp_path):
    out = tmp_path / "tok"
    stdin = "".join(json.dumps({"text": t}) + "\n" for t in corpus["lines"][:50])
    result = cli(
        "tokenize-train", corpus["txt"], "-", "--vocab-size", "300", "-o", out, "--json", input=stdin
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["training_records"] + summary["eval_records"] == 350
    provenance = json.loads((out / "llmctl.json").read_text())
    assert [i["path"] for i in provenance["inputs"]][1] == "-"


def test_sample_lines_caps_the_training_records_and_follows_the_seed(cli, corpus, tmp_path):
    summaries = []
    for i, seed in enumerate((1, 1, 2)):
        args = ["--sample-lines", "100", "--seed", str(seed), "--vocab-size", "300", "--json"]
        result = cli("tokenize-train", corpus["txt"], *args, "-o", tmp_path / str(i))
        assert result.exit_code == 0, result.stderr
        summaries.append(json.loads(result.stdout))
    assert [s["training_records"] for s in summaries] == [100, 100, 100]
    files = [(tmp_path / str(i) / "tokenizer.json").read_bytes() for i in range(3)]
    assert files[0] == files[1] != files[2]


def test_chatml_adds_its_special_tokens_and_template(cli, corpus, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "tok"
    result = cli(
        "tokenize-train", corpus["txt"], "--chat-template", "chatml", "--vocab-size", "300", "-o", out
    )
    assert result.exit_code == 0, result.stderr
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("<|im_start|>") == ids[0] and tok.eos_token == "<|im_end|>"


def test_byte_fallback_unigram_has_byte_tokens_and_no_unknowns(cli, corpus, tmp_path):
    from tokenizers import Tokenizer

    out = tmp_path / "tok"
    args = ["--algo", "unigram", "--byte-fallback", "--special-tokens", "<s>,</s>", "--vocab-size", "400"]
    result = cli("tokenize-train", corpus["txt"], *args, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    vocab = tok.get_vocab()
    assert [vocab[t] for t in ("<unk>", "<s>", "</s>", "<0x00>", "<0xFF>")] == [0, 1, 2, 3, 258]
    assert 300 < tok.get_vocab_size() <= 400  # HF stops early when the corpus runs out of pieces
    assert tok.token_to_id("<unk>") not in tok.encode(SAMPLE).ids
    assert tok.decode(tok.encode(SAMPLE).ids) == SAMPLE


def test_trained_tokenizer_works_with_llmctl_tokenize(cli, corpus, tmp_path):
    out = tmp_path / "tok"
    assert cli("tokenize-train", corpus["txt"], "--vocab-size", "300", "-o", out, "-q").exit_code == 0
    encoded = cli("tokenize", out, corpus["jsonl"], "--text-field", "meta.body")
    assert encoded.exit_code == 0, encoded.stderr
    decoded = cli("tokenize", out, "-", "--decode", "--text-field", "back", input=encoded.stdout)
    assert decoded.exit_code == 0, decoded.stderr
    records = read_jsonl(decoded.stdout)
    assert len(records) == 300
    assert [r["back"] for r in records] == [r["meta"]["body"] for r in records]


def test_config_file_supplies_defaults(cli, corpus, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("algo: wordpiece\nvocab-size: 250\n")
    result = cli("tokenize-train", corpus["txt"], "--config", config, "-o", tmp_path / "tok", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["algo"] == "wordpiece" and summary["vocab_size"] <= 250


@pytest.mark.parametrize(
    "make,args,code,message",
    [
        (lambda p: p.write_text(""), [], 3, "empty corpus"),
        (lambda p: p.write_text("  \n\n"), [], 3, "empty corpus"),
        (lambda p: p.write_bytes(b"fine line\nbad \xff byte\n"), [], 3, "corpus.txt:2: invalid UTF-8"),
        (lambda p: p.write_text("some text\n"), ["--vocab-size", "200"], 2, "leaves no room"),
        (lambda p: p.write_text("abcdefghij\n"), ["--algo", "wordpiece", "--vocab-size", "5"], 2, "smaller"),
        (lambda p: p.write_text("abcdefghij\n"), ["--algo", "unigram", "--vocab-size", "5"], 2, "smaller"),
        (lambda p: p.write_text("text\n"), ["--byte-level", "--byte-fallback"], 2, "--byte-fallback"),
        (lambda p: p.write_text("text\n"), ["--algo", "wordpiece", "--byte-level"], 2, "character-level"),
        (lambda p: p.write_text("text\n"), ["--chat-template", "missing.jinja"], 2, "--chat-template"),
    ],
    ids=["empty", "blank", "bad-utf8", "vocab-below-bytes", "wordpiece-alphabet", "unigram-alphabet",
         "byte-level-and-fallback", "wordpiece-byte-level", "missing-template"],
)  # fmt: skip
def test_bad_input_is_one_line_error_and_writes_nothing(cli, tmp_path, make, args, code, message):
    path = tmp_path / "corpus.txt"
    make(path)
    result = cli("tokenize-train", path, *args, "-o", tmp_path / "tok")
    assert result.exit_code == code, result.stderr
    assert result.stderr.startswith("llmctl tokenize-train: error:") and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]


def test_unknown_pre_tokenizer_is_a_one_line_usage_error(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("text\n")
    done = run_llmctl("tokenize-train", path, "--pre-tokenizer", "bert", "-o", tmp_path / "tok")
    stderr = done.stderr.decode()
    assert done.returncode == 2
    assert stderr.startswith("llmctl tokenize-train: error:") and stderr.count("\n") == 1, stderr
    assert "'bert' is not one of 'gpt2', 'cl100k', 'o200k'" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]


def test_existing_output_is_refused_without_force(cli, corpus, tmp_path):
    out = tmp_path / "tok"
    out.mkdir()
    result = cli("tokenize-train", corpus["txt"], "--vocab-size", "300", "-o", out)
    assert result.exit_code == 2 and "--force" in result.stderr
    assert cli("tokenize-train", corpus["txt"], "--vocab-size", "300", "-o", out, "--force").exit_code == 0
    assert (out / "tokenizer.json").is_file()


def test_skip_bad_lines_counts_them(cli, tmp_path):
    path = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": t}) for t in synthetic_lines(40)] + ["{not json", json.dumps({"other": 1})]
    path.write_text("\n".join(lines) + "\n")
    result = cli("tokenize-train", path, "--vocab-size", "300", "-o", tmp_path / "tok", "--json")
    assert result.exit_code == 3 and "c.jsonl:41: malformed JSON" in result.stderr
    result = cli(
        "tokenize-train", path, "--vocab-size", "300", "-o", tmp_path / "tok", "--json", "--skip-bad-lines"
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["skipped_lines"] == 2
    assert "skipped 2 bad line(s)" in result.stderr


def test_init_with_the_trained_vocab_gives_a_model_whose_loss_decreases(cli, corpus, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_dir, model_dir = tmp_path / "tok", tmp_path / "model"
    assert cli("tokenize-train", corpus["txt"], "--vocab-size", "400", "-o", tok_dir).exit_code == 0
    result = cli("init", "--preset", "llama-tiny", "--vocab-from", tok_dir, "--seed", "0", "-o", model_dir)
    assert result.exit_code == 0, result.stderr
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.vocab_size >= 400
    ids = tokenizer(" ".join(corpus["lines"][:60]), add_special_tokens=False)["input_ids"]
    batch = torch.tensor(ids[: 8 * 64]).view(8, 64)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(model.config.vocab_size)) < 0.5, losses  # random init: uniform guess
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < 0.8 * losses[0], losses
