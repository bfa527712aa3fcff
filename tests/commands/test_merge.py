"""llmctl merge: flag forms, mergekit recipes, the output directory, errors and exit codes."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmctl.core.merge.loader import LazyModel
from tests.conftest import run_llmctl
from tests.core.merge.fixtures import make_family


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("merge-family"))


def _tensors(path):
    model = LazyModel(path)
    return {n: model.get(n) for n in model.names()}


def test_ties_flags_write_a_model_that_loads_and_generates(cli, family, tmp_path):
    base, (ft1, ft2, _) = family
    out = tmp_path / "merged"
    result = cli(
        "merge",
        "--base",
        base,
        ft1,
        ft2,
        "--ties",
        "--density",
        "0.5",
        "--weights",
        "0.6,0.4",
        "-o",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["method"] == "ties" and summary["tensors"] == len(_tensors(base))
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "llmctl.json",
    ):
        assert (out / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("hello", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 4
    recipe = json.loads((out / "llmctl.json").read_text())["merge"]["recipe"]
    assert recipe["merge_method"] == "ties" and recipe["models"][0]["parameters"] == {
        "weight": 0.6,
        "density": 0.5,
    }


def test_flag_form_and_recipe_give_identical_bytes(cli, family, tmp_path):
    base, (ft1, ft2, _) = family
    recipe = tmp_path / "merge.yaml"
    recipe.write_text(f"""
merge_method: dare_linear
base_model: {base}
models:
  - {{model: {ft1}, parameters: {{weight: 0.6, density: 0.3}}}}
  - {{model: {ft2}, parameters: {{weight: 0.4, density: 0.3}}}}
""")
    a = cli("merge", "--config", recipe, "-o", tmp_path / "a", "--seed", "3", "--quiet")
    b = cli(
        "merge",
        "--base",
        base,
        ft1,
        ft2,
        "--dare-linear",
        "--density",
        "0.3",
        "--weights",
        "0.6,0.4",
        "--seed",
        "3",
        "-o",
        tmp_path / "b",
        "--quiet",
    )
    assert a.exit_code == 0 and b.exit_code == 0, a.stderr + b.stderr
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()


def test_slerp_of_two_models_starts_at_the_first(cli, family, tmp_path):
    _, (ft1, ft2, _) = family
    assert cli("merge", ft1, ft2, "--slerp", "--t", "0", "-o", tmp_path / "t0", "--quiet").exit_code == 0
    ours, first = _tensors(tmp_path / "t0"), _tensors(ft1)
    assert all(torch.allclose(ours[n], first[n], atol=1e-6) for n in first)


def test_small_max_shard_size_writes_shards_with_an_index(cli, family, tmp_path):
    base, (ft1, ft2, ft3) = family
    out = tmp_path / "stock"
    result = cli(
        "merge", "--base", base, ft1, ft2, ft3, "--model-stock", "--max-shard-size", "100KB", "-o", out
    )
    assert result.exit_code == 0, result.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--ties", "--weights", "1,1"], 2, "needs a base model"),
        (["--base", "{base}", "--ties", "--weights", "1,1", "--density", "1.5"], 2, r"density .* \(0, 1\]"),
        (["--base", "{base}", "--ties", "--density", "0.5"], 2, "needs parameter weight"),
        (["--base", "{base}", "--method", "soup"], 2, "unknown merge method 'soup'"),
        (["--linear", "--ties"], 2, "choose one merge method"),
        (["--slerp"], 2, "needs parameter t"),
        (["--base", "{base}", "--ties", "--weights", "1,1,1"], 2, "3 values for 2 models"),
    ],
)
def test_bad_flags_are_one_line_usage_errors_and_write_nothing(cli, family, tmp_path, args, code, message):
    base, (ft1, ft2, _) = family
    args = [a.format(base=base) for a in args]
    result = cli("merge", ft1, ft2, *args, "-o", tmp_path / "out")
    assert result.exit_code == code, result.stderr
    assert result.stderr.startswith("llmctl merge: error: ") and len(result.stderr.strip().splitlines()) == 1
    assert re.search(message, result.stderr), result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_path_that_is_not_a_model_names_it_and_exits_1(cli, family, tmp_path):
    _, (ft1, _, _) = family
    result = cli("merge", ft1, tmp_path, "--linear", "--weights", "1,1", "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert f"{tmp_path} has no config.json" in result.stderr
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_unless_force(cli, family, tmp_path):
    _, (ft1, ft2, _) = family
    (tmp_path / "out").mkdir()
    args = ["merge", ft1, ft2, "--linear", "--weights", "1,1", "-o", tmp_path / "out", "--quiet"]
    assert cli(*args).exit_code == 2
    assert cli(*args, "--force").exit_code == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_runs_as_a_real_process_with_a_recipe_using_slices(family, tmp_path):
    base, (ft1, ft2, _) = family
    recipe = tmp_path / "slices.yaml"
    recipe.write_text(f"""
merge_method: slerp
base_model: {ft1}
slices:
  - sources:
      - {{model: {ft1}, layer_range: [0, 2]}}
      - {{model: {ft2}, layer_range: [0, 2]}}
parameters:
  t: [{{filter: self_attn, value: [0, 1]}}, {{value: 0.5}}]
""")
    done = run_llmctl("merge", "--config", recipe, "-o", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert b"wrote" in done.stderr and done.stdout == b""
    ours, a, b = _tensors(tmp_path / "out"), _tensors(ft1), _tensors(ft2)
    name0, name1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    assert torch.allclose(ours[name0], a[name0], atol=1e-6)  # t = 0 at the first layer
    assert torch.allclose(ours[name1], b[name1], atol=1e-6)  # t = 1 at the last


def test_help_ends_with_runnable_examples(cli):
    result = cli("merge", "--help")
    assert result.exit_code == 0
    tail = result.stdout[result.stdout.index("Examples:") :]
    assert re.search(r"^\s+llmctl merge \S", tail, re.M)


def test_a_config_of_option_defaults_still_works_and_flags_win(cli, family, tmp_path):
    _, (ft1, ft2, _) = family
    defaults = tmp_path / "defaults.yaml"
    defaults.write_text("max-shard-size: 100KB\nweights: 1,1\n")
    out = tmp_path / "out"
    result = cli("merge", ft1, ft2, "--linear", "--config", defaults, "--weights", "3,1", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["shards"] > 1
    recipe = json.loads((out / "llmctl.json").read_text())["merge"]["recipe"]
    assert [m["parameters"]["weight"] for m in recipe["models"]] == [3.0, 1.0]


def test_a_recipe_and_models_on_the_command_line_conflict(cli, family, tmp_path):
    _, (ft1, ft2, _) = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodels: [{{model: {ft1}}}]\n")
    result = cli("merge", ft2, "--config", recipe, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "not both" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's error")
def test_device_cuda_without_a_gpu_is_a_one_line_error_and_writes_nothing(cli, family, tmp_path):
    base, (ft1, ft2, _) = family
    result = cli(
        "merge", ft1, ft2, "--linear", "--weights", "1,1", "--device", "cuda", "-o", tmp_path / "out"
    )
    assert result.exit_code == 1
    assert "no CUDA GPU is available" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["--ties", "--dare-linear", "--task-arithmetic"])
def test_device_cuda_gives_the_cpu_result(cli, family, tmp_path, method):
    base, (ft1, ft2, _) = family
    common = ["merge", "--base", base, ft1, ft2, method, "--weights", "0.6,0.4", "--quiet"]
    if method != "--task-arithmetic":
        common += ["--density", "0.5"]
    assert cli(*common, "-o", tmp_path / "cpu").exit_code == 0
    assert cli(*common, "--device", "cuda", "-o", tmp_path / "gpu").exit_code == 0
    cpu, gpu = _tensors(tmp_path / "cpu"), _tensors(tmp_path / "gpu")
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        if method == "--dare-linear":  # the GPU's random stream differs: compare what is deterministic
            assert cpu[name].shape == gpu[name].shape and cpu[name].dtype == gpu[name].dtype
        else:
            assert torch.allclose(cpu[name], gpu[name], atol=1e-6), name
