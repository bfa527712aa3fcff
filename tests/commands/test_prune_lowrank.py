"""llmctl prune --method lowrank end to end: a smaller factored checkpoint that llmctl's eval and generate
load, a --materialize twin that transformers loads, the same numbers from both, and bad ranges exit 2."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import read_jsonl, write_jsonl


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pair(tiny_model, tmp_path_factory):
    """The tiny model pruned to rank ratio 0.25, factored and materialized (same factors: no calibration)."""
    from typer.testing import CliRunner

    from llmctl.cli import app

    root = tmp_path_factory.mktemp("lowrank")
    runner = CliRunner()
    summaries = {}
    for name, extra in (("factored", []), ("dense", ["--materialize"])):
        args = ["prune", str(tiny_model), "--method", "lowrank", "--rank-ratio", "0.25", *extra]
        result = runner.invoke(app, [*args, "-o", str(root / name), "--json"])
        assert result.exit_code == 0, result.output
        summaries[name] = json.loads(result.stdout)
    return root / "factored", root / "dense", summaries


def test_factored_checkpoint_is_smaller_on_disk_and_records_its_ranks(pair, tiny_model):
    factored, dense, summaries = pair
    s = summaries["factored"]
    assert s["factored"] == 14 and s["kept_dense"] == [] and not s["materialized"]
    assert s["parameters_after"] < s["parameters_before"]
    assert s["size_bytes"] < summaries["dense"]["size_bytes"]
    assert (factored / "model.safetensors").stat().st_size < (tiny_model / "model.safetensors").stat().st_size
    config = json.loads((factored / "config.json").read_text())
    assert config["llmctl_lowrank"] == s["ranks"]
    assert config["llmctl_lowrank"]["model.layers.0.self_attn.q_proj"] == 16
    provenance = json.loads((factored / "llmctl.json").read_text())
    assert provenance["summary"]["ranks"] == s["ranks"]
    weights = load_file(str(factored / "model.safetensors"))
    assert weights["model.layers.1.mlp.down_proj.lowrank_a.weight"].shape == (16, 128)
    assert weights["model.layers.1.mlp.down_proj.lowrank_b.weight"].shape == (64, 16)
    assert "model.layers.1.mlp.down_proj.weight" not in weights
    assert "llmctl_lowrank" not in json.loads((dense / "config.json").read_text())


def test_transformers_loads_the_materialized_model_with_the_factored_models_logits(pair):
    from llmctl.core.models.hf import load_model, resolve_model

    factored, dense, _ = pair
    hf = AutoModelForCausalLM.from_pretrained(dense).eval()
    ours = load_model(resolve_model(factored), device="cpu", dtype="float32")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, hf(input_ids=ids).logits, atol=1e-5, rtol=1e-4)


def test_eval_and_generate_give_the_same_answers_on_the_factored_and_the_materialized_model(
    cli, pair, tmp_path
):
    factored, dense, _ = pair
    data = tmp_path / "corpus.txt"
    data.write_text("The first line of text.\nA second, longer line of text for the model.\n")
    ppl = {}
    for model in (factored, dense):
        result = cli("eval", model, "--task", "perplexity", "--data", data, "--max-length", "16", "--json")
        assert result.exit_code == 0, result.stderr
        ppl[model] = json.loads(result.stdout)["results"]["perplexity"]["word_perplexity,none"]
    assert ppl[factored] == pytest.approx(ppl[dense], rel=1e-5)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}, {"prompt": "Once upon a time"}])
    outs = {}
    for model in (factored, dense):
        result = cli("generate", model, prompts, "--max-tokens", "8", "--ignore-eos", "--logprobs")
        assert result.exit_code == 0, result.stderr
        outs[model] = read_jsonl(result.stdout)
    assert [r["completion"] for r in outs[factored]] == [r["completion"] for r in outs[dense]]
    assert all(r["usage"]["completion_tokens"] == 8 for r in outs[factored])


def test_activation_weighted_run_calibrates_and_reports(cli, tiny_model, tmp_path):
    out = tmp_path / "aw"
    result = cli(
        "prune", tiny_model, "--method", "lowrank", "--energy", "0.5", "--activation-weighted",
        "--calib-samples", "2", "--calib-seq-len", "32", "--skip", "k_proj,v_proj", "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "factored" in result.stderr and "model.layers.0.mlp.up_proj" in result.stderr
    summary = json.loads((out / "llmctl.json").read_text())["summary"]
    assert summary["activation_weighted"] and summary["calibration"]["samples"] == 2
    assert not any("k_proj" in name for name in summary["ranks"])


@pytest.mark.parametrize(
    "flags",
    [
        ["--rank-ratio", "0"],
        ["--rank-ratio", "1.5"],
        ["--energy", "0"],
        ["--energy", "2"],
        [],
        ["--rank-ratio", "0.5", "--energy", "0.9"],
        ["--rank-ratio", "0.5", "--sparsity", "0.5"],
    ],
)
def test_bad_ranges_and_combinations_exit_2_with_one_line_and_no_output(cli, tiny_model, tmp_path, flags):
    out = tmp_path / "never"
    result = cli("prune", tiny_model, "--method", "lowrank", *flags, "-o", out)
    assert result.exit_code == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_lowrank_flags_on_other_methods_exit_2(cli, tiny_model, tmp_path):
    result = cli(
        "prune", tiny_model, "--method", "wanda", "--sparsity", "0.5", "--materialize", "-o", tmp_path / "x"
    )
    assert result.exit_code == 2 and "--materialize" in result.stderr
