"""llmctl generate through the CLI: JSONL in and out, overrides, errors, the real model."""

import json

import pytest

from tests.conftest import read_jsonl, run_llmctl, write_jsonl


def test_records_get_completions_and_keep_their_fields(cli, tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "a", "prompt": "Hello", "max_tokens": 5, "meta": {"k": 1}},
        {"id": "b", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0.9, "seed": 2},
    ])  # fmt: skip
    result = cli("generate", tiny_model, path, "--max-tokens", "7", "--ignore-eos")
    assert result.exit_code == 0, result.stderr
    a, b = read_jsonl(result.stdout)
    assert list(a)[:4] == ["id", "prompt", "max_tokens", "meta"] and a["meta"] == {"k": 1}
    assert a["usage"]["completion_tokens"] == 5 and a["finish_reason"] == "length"
    assert isinstance(a["completion"], str)
    assert b["message"]["role"] == "assistant" and b["usage"]["completion_tokens"] == 7


def test_output_is_the_same_whatever_the_batch_size(cli, tiny_model, tmp_path):
    records = [{"prompt": "x" * (i + 1), "temperature": 1.0, "seed": i} for i in range(5)]
    path = write_jsonl(tmp_path / "p.jsonl", records)
    outs = {
        cli("generate", tiny_model, path, "--max-tokens", "6", "--batch-size", b).stdout
        for b in ("1", "2", "5")
    }
    assert len(outs) == 1


def test_n_samples_and_logprobs(cli, tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}])
    result = cli("generate", tiny_model, path, "--n", "3", "--temperature", "1", "--max-tokens", "4",
                 "--ignore-eos", "--top-logprobs", "2")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    record = read_jsonl(result.stdout)[0]
    assert [c["index"] for c in record["choices"]] == [0, 1, 2]
    assert record["usage"]["completion_tokens"] == 12
    lp = record["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == 4 and all(v <= 0 for v in lp["token_logprobs"])
    assert all(len(d) == 2 for d in lp["top_logprobs"])


def test_bad_lines_exit_3_naming_the_line_or_are_skipped_keeping_the_rest(cli, tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "ok"}, {"messages": [{"role": "wizard", "content": "x"}]}, {"prompt": "a" * 600},
        {"prompt": "fine", "temperature": -1}, {"prompt": "also ok"},
    ])  # fmt: skip
    result = cli("generate", tiny_model, path, "--max-tokens", "2")
    assert result.exit_code == 3
    assert "p.jsonl:2: unknown chat role 'wizard'" in result.stderr
    result = cli("generate", tiny_model, path, "--max-tokens", "2", "--skip-bad-lines")
    assert result.exit_code == 0, result.stderr
    assert [r["prompt"] for r in read_jsonl(result.stdout)] == ["ok", "also ok"]
    assert "skipped 3 bad line(s)" in result.stderr


def test_contradictory_flags_are_usage_errors(cli, tiny_model):
    assert cli("generate", tiny_model, "--chat").exit_code == 2
    assert cli("generate", tiny_model, "--prompt", "x", "--top-p", "0").exit_code == 2


@pytest.mark.slow
def test_smollm2_answers_paris_from_the_command_line(smollm2):
    result = run_llmctl("generate", smollm2, "--chat", "--prompt", "What is the capital of France?",
                        "--max-tokens", "20")  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().strip() == "The capital of France is Paris."
    line = json.dumps({"id": 7, "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    result = run_llmctl("generate", smollm2, "--max-tokens", "20", input=line + "\n")
    record = read_jsonl(result.stdout)[0]
    assert record["message"]["content"] == "The capital of France is Paris."
    assert record["finish_reason"] == "stop" and record["id"] == 7


def test_prompt_lookup_flag_gives_the_same_output_and_reports_acceptance(cli, tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "abcabcabcabc"}, {"prompt": "xyzxyz"}])
    plain = cli("generate", tiny_model, path, "--max-tokens", "12", "--ignore-eos")
    fast = cli("generate", tiny_model, path, "--max-tokens", "12", "--ignore-eos", "--prompt-lookup", "4")
    assert fast.exit_code == 0, fast.stderr
    assert fast.stdout == plain.stdout
    assert "prompt lookup:" in fast.stderr
    jacobi = cli("generate", tiny_model, path, "--max-tokens", "12", "--ignore-eos", "--lookahead", "3")
    assert jacobi.stdout == fast.stdout and "lookahead:" in jacobi.stderr
    assert cli("generate", tiny_model, path, "--prompt-lookup", "4", "--temperature", "0.5").exit_code == 2


def test_num_beams_returns_the_n_best_hypotheses_with_scores_best_first(cli, tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": 1, "prompt": "Hello"}, {"id": 2, "prompt": "a b"}])
    result = cli("generate", tiny_model, path, "--num-beams", "3", "--n", "2", "--max-tokens", "5",
                 "--ignore-eos")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    for record in read_jsonl(result.stdout):
        scores = [c["score"] for c in record["choices"]]
        assert len(scores) == 2 and scores == sorted(scores, reverse=True)
    single = cli("generate", tiny_model, path, "--num-beams", "3", "--max-tokens", "5", "--ignore-eos")
    best = [r["completion"] for r in read_jsonl(single.stdout)]
    assert best == [r["choices"][0]["completion"] for r in read_jsonl(result.stdout)]
    assert cli("generate", tiny_model, path, "--num-beams", "2", "--temperature", "0.5").exit_code == 2
    assert cli("generate", tiny_model, path, "--num-beams", "2", "--early-stopping", "maybe").exit_code == 2


def test_draft_model_speculative_decoding_gives_greedy_output_and_reports_acceptance(
    cli, tiny_model, tmp_path
):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}, {"prompt": "a b a b"}])
    plain = cli("generate", tiny_model, path, "--max-tokens", "9", "--ignore-eos")
    spec = cli("generate", tiny_model, path, "--max-tokens", "9", "--ignore-eos", "--draft", tiny_model,
               "--num-draft-tokens", "3")  # fmt: skip
    assert spec.exit_code == 0, spec.stderr
    assert spec.stdout == plain.stdout
    assert "speculative decoding: " in spec.stderr and "(100%)" in spec.stderr
    both = cli("generate", tiny_model, path, "--draft", tiny_model, "--num-beams", "2")
    assert both.exit_code == 2 and "choose one of" in both.stderr


def test_draft_vocab_keeps_speculative_greedy_output_and_needs_a_draft(cli, tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}, {"prompt": "a b a b"}])
    plain = cli("generate", tiny_model, path, "--max-tokens", "9", "--ignore-eos")
    spec = cli("generate", tiny_model, path, "--max-tokens", "9", "--ignore-eos", "--draft", tiny_model,
               "--draft-vocab", "16")  # fmt: skip
    assert spec.exit_code == 0, spec.stderr
    assert spec.stdout == plain.stdout
    alone = cli("generate", tiny_model, path, "--draft-vocab", "16")
    assert alone.exit_code == 2 and "--draft-vocab and --draft-confidence go with --draft" in alone.stderr


def test_json_schema_flag_and_per_line_response_format_constrain_outputs(cli, tiny_model, tmp_path):
    schema = {"type": "object", "properties": {"x": {"enum": [1, 2, 3]}}, "required": ["x"],
              "additionalProperties": False}  # fmt: skip
    schema_file = tmp_path / "s.json"
    schema_file.write_text(json.dumps(schema))
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "A"},
        {"prompt": "B", "response_format": {"type": "json_schema", "json_schema": {"name": "y", "schema": {
            "type": "object", "properties": {"y": {"type": "boolean"}}, "required": ["y"],
            "additionalProperties": False}}}},
    ])  # fmt: skip
    result = cli(
        "generate", tiny_model, path, "--json-schema", schema_file, "--temperature", "1", "--max-tokens", "40"
    )
    assert result.exit_code == 0, result.stderr
    a, b = read_jsonl(result.stdout)
    assert json.loads(a["completion"])["x"] in (1, 2, 3)
    assert isinstance(json.loads(b["completion"])["y"], bool)
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "nonsense"}')
    result = cli("generate", tiny_model, path, "--json-schema", bad)
    assert result.exit_code == 2 and "invalid json schema" in result.stderr
    bad_line = write_jsonl(
        tmp_path / "q.jsonl", [{"prompt": "A"}, {"prompt": "B", "response_format": {"type": "xml"}}]
    )
    result = cli("generate", tiny_model, bad_line, "--max-tokens", "2")
    assert result.exit_code == 3 and "q.jsonl:2: unknown response_format type 'xml'" in result.stderr


def test_stream_with_jsonl_input_emits_deltas_that_add_up_to_each_completion(cli, tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "Hello"}, {"prompt": "x", "n": 2,
                                               "temperature": 1.0}])  # fmt: skip
    result = cli("generate", tiny_model, path, "--stream", "--max-tokens", "8", "--ignore-eos")
    assert result.exit_code == 0, result.stderr
    lines = read_jsonl(result.stdout)
    finals = [x for x in lines if "delta" not in x]
    assert [f.get("id") for f in finals] == ["a", None]
    deltas = [x for x in lines if "delta" in x]
    joined = "".join(d["delta"] for d in deltas if d["id"] == "a")
    assert joined == finals[0]["completion"]
    for i, choice in enumerate(finals[1]["choices"]):
        assert (
            "".join(d["delta"] for d in deltas if d["line"] == 2 and d["index"] == i) == choice["completion"]
        )
    plain = cli("generate", tiny_model, path, "--max-tokens", "8", "--ignore-eos")
    assert read_jsonl(plain.stdout) == finals
