"""llmctl eval through the CLI: results in lm-eval's shape, samples, errors."""

import json

import pytest

from tests.conftest import read_jsonl, write_jsonl

ARC = [{"question": f"What is {i} plus one?", "choices": [str(i + 1), str(i + 2), "cat"], "answer": 0}
       for i in range(6)]  # fmt: skip


def test_multiple_choice_results_use_lm_evals_keys_and_samples_are_logged(cli, tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "arc.jsonl", ARC)
    out, samples = tmp_path / "results.json", tmp_path / "samples.jsonl"
    result = cli(
        "eval", tiny_model, "--task", "arc", "--data", data, "-o", out, "--log-samples", samples, "--quiet"
    )
    assert result.exit_code == 0, result.stderr
    results = json.loads(out.read_text())
    values = results["results"]["arc"]
    assert {"acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none", "ece,none"} <= set(values)
    assert results["n-samples"]["arc"] == {"original": 6, "effective": 6}
    assert len(results["model_provenance"]["config_sha256"]) == 64

    logged = read_jsonl(samples.read_text())
    assert len(logged) == 6
    assert values["acc,none"] == pytest.approx(sum(s["acc"] for s in logged) / 6)
    assert all(len(s["loglikelihoods"]) == 3 for s in logged)


def test_results_name_the_command_that_made_the_model(cli, tmp_path):
    model = tmp_path / "m"
    assert cli("init", "-o", model, "--seed", "5", "--quiet").exit_code == 0
    data = write_jsonl(tmp_path / "arc.jsonl", ARC[:2])
    result = cli("eval", model, "--task", "arc", "--data", data, "--json", "--quiet")
    made_by = json.loads(result.stdout)["model_provenance"]["made_by"]
    assert made_by["command"] == "init" and made_by["seed"] == 5


def test_perplexity_on_a_text_file(cli, tiny_model, tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text("The first line of text.\nA second, longer line of text for the model.\n")
    result = cli("eval", tiny_model, "--task", "perplexity", "--data", data, "--max-length", "8", "--json")
    assert result.exit_code == 0, result.stderr
    values = json.loads(result.stdout)["results"]["perplexity"]
    assert values["word_perplexity,none"] > values["byte_perplexity,none"] > 1
    assert values["bits_per_byte,none"] == pytest.approx(
        __import__("math").log2(values["byte_perplexity,none"]), rel=1e-9
    )


def test_generative_task_reports_each_filter(cli, tiny_model, tmp_path):
    docs = [{"question": "1+1?", "answer": "It is 2.\n#### 2"}, {"question": "2+2?", "answer": "#### 4"}]
    data = write_jsonl(tmp_path / "gsm.jsonl", docs)
    result = cli("eval", tiny_model, "--task", "gsm8k", "--data", data, "--fewshot-data", data,
                 "--num-fewshot", "1", "--json", "--batch-size", "2")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    values = json.loads(result.stdout)["results"]["gsm8k"]
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(values)


def test_bad_inputs_exit_with_one_line_and_write_nothing(cli, tiny_model, tmp_path):
    out = tmp_path / "r.json"
    result = cli("eval", tiny_model, "--task", "nope", "-o", out)
    assert result.exit_code == 3 and "unknown task" in result.stderr
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "choices": ["a"], "answer": 3}])
    result = cli("eval", tiny_model, "--task", "arc", "--data", bad, "-o", out)
    assert result.exit_code == 3 and "not an index" in result.stderr
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"query": "q", "choices": ["a"], "answer": 0}])
    result = cli("eval", tiny_model, "--task", "arc", "--data", missing, "-o", out)
    assert result.exit_code == 3 and "question" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("task", ["arc", "perplexity", "gsm8k"])
def test_shards_merged_give_the_numbers_of_one_run(cli, tiny_model, tmp_path, task):
    if task == "arc":
        data = write_jsonl(tmp_path / "d.jsonl", ARC)
    elif task == "perplexity":
        data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"document {i} " * (i + 2)} for i in range(7)])
    else:
        data = write_jsonl(
            tmp_path / "d.jsonl", [{"question": f"{i}?", "answer": f"#### {i}"} for i in range(5)]
        )
    common = ["--task", task, "--data", data, "--max-length", "32", "--num-fewshot", "0", "--quiet"]
    assert cli("eval", tiny_model, *common, "-o", tmp_path / "all.json").exit_code == 0
    shards = []
    for i in range(3):
        path = tmp_path / f"s{i}.json"
        result = cli("eval", tiny_model, *common, "--shard", f"{i}/3", "-o", path)
        assert result.exit_code == 0, result.stderr
        shards += ["--merge-shards", path]
    assert cli("eval", *shards, "-o", tmp_path / "merged.json", "--quiet").exit_code == 0
    single = json.loads((tmp_path / "all.json").read_text())["results"]
    merged = json.loads((tmp_path / "merged.json").read_text())["results"]
    assert merged == single


def test_merge_needs_every_shard_once(cli, tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ARC)
    path = tmp_path / "s0.json"
    cli("eval", tiny_model, "--task", "arc", "--data", data, "--shard", "0/2", "-o", path, "--quiet")
    result = cli("eval", "--merge-shards", path, "-o", tmp_path / "m.json")
    assert result.exit_code == 3 and "every shard 0..n-1" in result.stderr


def test_fit_temperature_reports_calibrated_ece(cli, tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ARC)
    result = cli("eval", tiny_model, "--task", "arc", "--data", data, "--fit-temperature", data, "--json")
    assert result.exit_code == 0, result.stderr
    values = json.loads(result.stdout)["results"]["arc"]
    assert values["temperature,none"] > 0 and 0 <= values["ece_calibrated,none"] <= 1


def test_a_gguf_model_gives_the_same_numbers_as_its_directory(cli, tiny_model, tmp_path):
    from llmctl.core.models.gguf_export import export_gguf

    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    export_gguf(tiny_model, gguf_dir / "tiny.gguf", outtype="f32")
    data = write_jsonl(tmp_path / "d.jsonl", ARC)
    args = ["--task", "arc", "--data", data, "--json", "--quiet"]
    from_dir = json.loads(cli("eval", tiny_model, *args).stdout)["results"]["arc"]
    from_gguf = json.loads(cli("eval", gguf_dir / "tiny.gguf", *args).stdout)["results"]["arc"]
    assert from_gguf == from_dir


def test_empty_data_is_an_input_error(cli, tiny_model, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "r.json"
    result = cli("eval", tiny_model, "--task", "arc", "--data", empty, "-o", out)
    assert result.exit_code == 3 and "no documents" in result.stderr and not out.exists()
