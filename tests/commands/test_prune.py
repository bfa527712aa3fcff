"""llmctl prune end to end: outputs that transformers loads, reports, and one-line errors for bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import read_jsonl, run_llmctl, write_jsonl

FAST = ("--calib-samples", "4", "--calib-seq-len", "32", "--batch-size", "2")


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models run faster on one intra-op thread than on two fighting a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _weights(directory):
    return load_file(str(directory / "model.safetensors"))


def _decoder_linears(weights):
    return {k: v for k, v in weights.items() if ".layers." in k and k.endswith("proj.weight")}


def _runs(directory):
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    return model


def test_wanda_writes_a_loadable_model_with_exact_row_sparsity_and_a_json_report(cli, tiny_model, tmp_path):
    out = tmp_path / "wanda"
    result = cli("prune", tiny_model, "--method", "wanda", "--sparsity", "0.5", *FAST, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["method"] == "wanda" and summary["sparsity"] == pytest.approx(0.5)
    assert len(summary["layers"]) == 14 and all(r["sparsity"] == 0.5 for r in summary["layers"])
    assert summary["parameters_before"] == summary["parameters_after"]
    assert summary["calibration"] == {"samples": 4, "seq_len": 32, "file": None}
    linears = _decoder_linears(_weights(out))
    assert len(linears) == 14
    for name, w in linears.items():
        assert ((w == 0).sum(1) == w.shape[1] // 2).all(), name
    _runs(out)
    provenance = json.loads((out / "llmctl.json").read_text())
    assert provenance["command"] == "prune" and provenance["summary"]["method"] == "wanda"
    assert (out / "tokenizer.json").is_file()


def test_sparsegpt_two_four_holds_in_the_saved_weights_and_eval_reports_perplexity(cli, tiny_model, tmp_path):
    calib = write_jsonl(
        tmp_path / "calib.jsonl", [{"body": f"sample {i}: " + "abc def ghi " * 20} for i in range(4)]
    )
    held_out = tmp_path / "eval.txt"
    held_out.write_text("the quick brown fox jumps over the lazy dog\nhello world, again and again\n")
    out = tmp_path / "sgpt"
    result = cli(
        "prune", tiny_model, "--method", "sparsegpt", "--pattern", "2:4", "--calib", calib,
        "--text-field", "body", *FAST, "--eval", held_out, "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "total" in result.stderr and "perplexity:" in result.stderr
    for name, w in _decoder_linears(_weights(out)).items():
        n, k = w.shape
        assert ((w != 0).reshape(n, k // 4, 4).sum(-1) <= 2).all(), name
    summary = json.loads((out / "llmctl.json").read_text())["summary"]
    assert summary["target"] == "2:4" and summary["calibration"]["file"] == str(calib)
    assert summary["perplexity_before"] > 1 and summary["perplexity_after"] > 1
    _runs(out)


@pytest.mark.parametrize("score", ["block-influence", "angular", "ppl"])
def test_layers_drop_writes_a_shallower_model_that_loads_and_generates(cli, tiny_model, tmp_path, score):
    out = tmp_path / "shallow"
    result = cli(
        "prune", tiny_model, "--method", "layers", "--score", score, "--drop", "1", *FAST, "-o", out, "--json"
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["num_layers_before"] == 2 and summary["num_layers_after"] == 1
    assert len(summary["dropped"]) == 1 and summary["parameters_after"] < summary["parameters_before"]
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    model = _runs(out)
    assert len(model.model.layers) == 1
    # the kept layer's weights are the original layer's, renumbered to 0
    kept = 1 - summary["dropped"][0]
    source = load_file(str(tiny_model / "model.safetensors"))
    assert torch.equal(
        _weights(out)["model.layers.0.mlp.up_proj.weight"], source[f"model.layers.{kept}.mlp.up_proj.weight"]
    )


def test_progressive_layers_on_a_domain_file(cli, tiny_model, tmp_path):
    domain = tmp_path / "domain.txt"
    domain.write_text("".join(f"Question {i}: what is {i} plus {i}? Answer: {2 * i}.\n" for i in range(40)))
    out = tmp_path / "prog"
    result = cli(
        "prune", tiny_model, "--method", "progressive-layers", "--domain", domain, "--drop", "1", *FAST,
        "-o", out, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["score"] == "domain-loss" and summary["num_layers_after"] == 1
    assert summary["history"][0]["removed"] == summary["dropped"][0]
    assert summary["calibration"]["file"] == str(domain)
    _runs(out)


@pytest.mark.parametrize(
    "method, key, expected",
    [("channels", "intermediate_size", 64), ("heads", "num_attention_heads", 2)],
)
def test_width_pruning_writes_a_smaller_model_that_loads_and_generates(
    cli, tiny_model, tmp_path, method, key, expected
):
    out = tmp_path / method
    result = cli("prune", tiny_model, "--method", method, "--keep-ratio", "0.5", *FAST, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert f"{key}: " in result.stderr
    assert json.loads((out / "config.json").read_text())[key] == expected
    summary = json.loads((out / "llmctl.json").read_text())["summary"]
    assert summary["parameters_after"] < summary["parameters_before"]
    _runs(out)


def test_drop_zero_is_the_identity(cli, tiny_model, tmp_path):
    out = tmp_path / "same"
    result = cli("prune", tiny_model, "--method", "layers", "--drop", "0", *FAST, "-o", out, "--quiet")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    a, b = _weights(out), load_file(str(tiny_model / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sparsity", "0"], "between 0 and 1"),
        (["--sparsity", "1.5"], "between 0 and 1"),
        (["--method", "magnitude", "--pattern", "2:5"], "does not divide the input dimension"),
        (["--pattern", "4:4"], "0 < N < M"),
        (["--sparsity", "0.5", "--pattern", "2:4"], "exactly one"),
        (["--method", "layers", "--drop", "2"], "every layer"),
        (["--method", "layers", "--keep-ratio", "0"], "keep-ratio"),
        (["--method", "layers"], "--drop K or --keep-ratio"),
        (["--method", "progressive-layers", "--drop", "1"], "--domain"),
        (["--method", "heads"], "--keep-ratio R"),
        (["--method", "channels", "--keep-ratio", "1.5"], "(0, 1]"),
    ],
)
def test_bad_input_is_a_one_line_usage_error_and_leaves_no_output(cli, tiny_model, tmp_path, args, message):
    out = tmp_path / "out"
    result = cli("prune", tiny_model, *args, *FAST, "-o", out)
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_an_existing_output_is_refused_without_force(cli, tiny_model, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    result = cli("prune", tiny_model, "--method", "magnitude", "--sparsity", "0.5", "-o", out)
    assert result.exit_code == 2 and "--force" in result.stderr
    result = cli(
        "prune", tiny_model, "--method", "magnitude", "--sparsity", "0.5", "-o", out, "--force", "--json"
    )
    assert result.exit_code == 0 and (out / "config.json").is_file()


def test_a_calibration_file_too_small_is_an_input_error(cli, tiny_model, tmp_path):
    calib = write_jsonl(tmp_path / "small.jsonl", [{"text": "tiny"}])
    result = cli("prune", tiny_model, "--sparsity", "0.5", "--calib", calib, *FAST, "-o", tmp_path / "o")
    assert result.exit_code == 3 and "--calib-samples" in result.stderr
    assert not (tmp_path / "o").exists()


def test_the_cli_defaults_match_the_library_defaults():
    from llmctl.commands.prune import CALIB_SAMPLES, CALIB_SEQ_LEN
    from llmctl.core.prune.run import DEFAULT_CALIB

    assert (CALIB_SAMPLES, CALIB_SEQ_LEN) == (DEFAULT_CALIB.samples, DEFAULT_CALIB.seq_len)


def test_a_real_pipeline_reads_the_json_report(tiny_model, tmp_path):
    out = tmp_path / "mag"
    done = run_llmctl("prune", tiny_model, "--method", "magnitude", "--pattern", "2:4", "-o", out, "--json")
    assert done.returncode == 0, done.stderr.decode()
    assert read_jsonl(done.stdout.decode().replace("\n", " ") + "\n")[0]["sparsity"] == pytest.approx(0.5)
