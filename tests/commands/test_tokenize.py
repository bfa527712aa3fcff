"""llmctl tokenize, and the JSONL contract end to end through real pipelines."""

import json

import pytest
from transformers import AutoTokenizer

from tests.conftest import read_jsonl, run_llmctl, shell, write_jsonl

TEXTS = ["Hello world", "héllo 👋 wörld", "  spaces   and\ttabs ", "漢字とかな"]


@pytest.fixture
def docs(tmp_path):
    records = [{"id": i, "text": t, "meta": {"n": i}} for i, t in enumerate(TEXTS)]
    return write_jsonl(tmp_path / "docs.jsonl", records)


def test_tokenize_adds_ids_equal_to_the_tokenizers_and_passes_other_fields_through(cli, tiny_model, docs):
    result = cli("tokenize", tiny_model, docs, "--attention-mask", "--batch-size", "3")
    assert result.exit_code == 0, result.stderr
    out = read_jsonl(result.stdout)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert [r["input_ids"] for r in out] == [tokenizer(t)["input_ids"] for t in TEXTS]
    assert all(r["attention_mask"] == [1] * len(r["input_ids"]) for r in out)
    assert [list(r) for r in out] == [["id", "text", "meta", "input_ids", "attention_mask"]] * len(TEXTS)
    assert [r["meta"] for r in out] == [{"n": i} for i in range(len(TEXTS))]
    assert "tokenized 4 records" in result.stderr


def test_output_does_not_depend_on_batch_size(cli, tiny_model, docs):
    outputs = {cli("tokenize", tiny_model, docs, "--batch-size", str(b)).stdout for b in (1, 2, 64)}
    assert len(outputs) == 1


def test_max_length_without_truncate_is_an_input_error_and_truncate_cuts(cli, tiny_model, docs):
    result = cli("tokenize", tiny_model, docs, "--max-length", "5")
    assert result.exit_code == 3
    assert "docs.jsonl:1: 11 tokens, more than --max-length 5" in result.stderr
    result = cli("tokenize", tiny_model, docs, "--max-length", "5", "--truncate")
    assert result.exit_code == 0
    assert [len(r["input_ids"]) for r in read_jsonl(result.stdout)] == [5, 5, 5, 5]


def test_pack_emits_fixed_length_sequences_joined_by_eos(cli, tiny_model, docs):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    stream = []
    for text in TEXTS:
        stream += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    result = cli("tokenize", tiny_model, docs, "--pack", "8")
    assert result.exit_code == 0, result.stderr
    seqs = [r["input_ids"] for r in read_jsonl(result.stdout)]
    assert all(len(s) == 8 for s in seqs)
    assert sum(seqs, []) == stream[: len(seqs) * 8]
    assert f"{len(stream) % 8} trailing tokens dropped" in result.stderr
    kept = read_jsonl(cli("tokenize", tiny_model, docs, "--pack", "8", "--keep-remainder").stdout)
    assert sum((r["input_ids"] for r in kept), []) == stream


def test_chat_records_are_rendered_with_the_chat_template(cli, tiny_model, tmp_path):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    result = cli("tokenize", tiny_model, path, "--apply-chat-template")
    assert result.exit_code == 0, result.stderr
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    expected = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
    assert read_jsonl(result.stdout)[0]["input_ids"] == expected["input_ids"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "no messages"}])
    result = cli("tokenize", tiny_model, bad, "--apply-chat-template")
    assert result.exit_code == 3 and "bad.jsonl:1: missing field 'messages'" in result.stderr


def test_decode_round_trips_through_a_real_pipeline(tiny_model, docs):
    result = shell(
        f"llmctl tokenize {tiny_model} {docs} | llmctl tokenize {tiny_model} --decode --text-field decoded"
    )
    assert result.returncode == 0, result.stderr.decode()
    out = read_jsonl(result.stdout)
    assert [r["decoded"] for r in out] == TEXTS
    assert [r["text"] for r in out] == TEXTS


def test_decode_rejects_ids_outside_the_vocabulary(cli, tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [1, 2]}, {"input_ids": [99999]}])
    result = cli("tokenize", tiny_model, path, "--decode")
    assert result.exit_code == 3
    assert "ids.jsonl:2: token id 99999 is outside the vocabulary" in result.stderr


def test_malformed_line_in_a_pipeline_gives_exit_3_naming_file_and_line(tiny_model, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{oops\n')
    result = run_llmctl("tokenize", tiny_model, path, "--batch-size", "1")
    assert result.returncode == 3
    stderr = result.stderr.decode().strip()
    assert stderr.splitlines() == [stderr]
    assert stderr.startswith(f"llmctl tokenize: error: {path}:3: malformed JSON")
    # With batches of one, the records before the bad line were already streamed out (flushed per record).
    assert len(read_jsonl(result.stdout)) == 2


def test_missing_text_field_gives_exit_3_and_skip_bad_lines_counts(tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}, {"body": "b"}, {"text": "c"}])
    result = run_llmctl("tokenize", tiny_model, path)
    assert result.returncode == 3
    assert "in.jsonl:2: missing field 'text'" in result.stderr.decode()
    result = run_llmctl("tokenize", tiny_model, path, "--skip-bad-lines")
    assert result.returncode == 0
    assert len(read_jsonl(result.stdout)) == 2
    assert "skipped 1 bad line(s)" in result.stderr.decode()


def test_text_field_dotted_path_and_stdin(tiny_model):
    line = json.dumps({"meta": {"body": "abc"}, "keep": True}) + "\n"
    result = run_llmctl("tokenize", tiny_model, "--text-field", "meta.body", input=line * 3)
    assert result.returncode == 0, result.stderr.decode()
    out = read_jsonl(result.stdout)
    assert len(out) == 3 and out[0]["keep"] is True and len(out[0]["input_ids"]) == 3


def test_head_closing_the_pipe_early_exits_cleanly(tiny_model, tmp_path):
    path = write_jsonl(
        tmp_path / "long.jsonl", [{"text": f"document number {i} " * 20} for i in range(20000)]
    )
    result = shell(f"llmctl tokenize {tiny_model} {path} --batch-size 8 | head -n 1")
    assert result.returncode == 0, result.stderr.decode()
    assert len(read_jsonl(result.stdout)) == 1
    assert "Traceback" not in result.stderr.decode()
    assert "BrokenPipe" not in result.stderr.decode()


def test_output_file_is_refused_when_it_exists(cli, tiny_model, docs, tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("keep\n")
    result = cli("tokenize", tiny_model, docs, "-o", out)
    assert result.exit_code == 2 and out.read_text() == "keep\n"
    assert cli("tokenize", tiny_model, docs, "-o", out, "--force").exit_code == 0
    assert len(read_jsonl(out.read_text())) == len(TEXTS)


def test_quiet_silences_the_summary(cli, tiny_model, docs):
    result = cli("tokenize", tiny_model, docs, "--quiet")
    assert result.exit_code == 0 and result.stderr == ""
