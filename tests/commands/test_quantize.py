"""llmctl quantize through the CLI: outputs, the --json summary, one-line errors and no partial output."""

import json

import pytest
from safetensors import safe_open

from llmctl.commands.quantize import EPILOG
from tests.conftest import write_jsonl

FAST = ["--calib-samples", "4", "--calib-seq-len", "32", "--group-size", "32", "--quiet"]


def test_gptq_writes_a_gptq_checkpoint_and_a_json_summary(cli, tiny_model, tmp_path):
    out = tmp_path / "gptq"
    result = cli("quantize", tiny_model, "--method", "gptq", "--act-order", "--json", "-o", out, *FAST)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["method"] == "gptq" and summary["format"] == "gptq" and summary["layers_quantized"] == 14
    assert summary["calibration"] == {"samples": 4, "seq_len": 32, "file": None}
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == json.loads((out / "quantize_config.json").read_text())
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"]) == (
        "gptq",
        4,
        32,
        True,
        True,
    )
    assert qc["checkpoint_format"] == "gptq"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        q = "model.layers.0.self_attn.q_proj"
        assert f.get_tensor(f"{q}.qweight").shape == (64 * 4 // 32, 64)
        assert f.get_tensor(f"{q}.scales").shape == (2, 64)
        assert f.get_tensor(f"{q}.g_idx").shape == (64,)
    assert f"{q}.weight" not in keys and "lm_head.weight" not in keys  # tied embeddings
    assert json.loads((out / "llmctl.json").read_text())["command"] == "quantize"


def test_awq_calibrates_on_a_jsonl_file(cli, tiny_model, tmp_path):
    calib = write_jsonl(
        tmp_path / "calib.jsonl", [{"body": f"line {i} of the calibration text " * 8} for i in range(20)]
    )
    out = tmp_path / "awq"
    result = cli(
        "quantize", tiny_model, "--method", "awq", "--calib", calib, "--text-field", "body", "-o", out, *FAST
    )
    assert result.exit_code == 0, result.stderr
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["version"], qc["zero_point"]) == ("awq", "gemm", True)
    provenance = json.loads((out / "llmctl.json").read_text())
    assert any(str(calib) in json.dumps(i) for i in provenance["inputs"])


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--group-size", "48"], 2, "--group-size 48 does not divide model.layers.0.self_attn.q_proj"),
        (["--method", "bnb-nf4", "--format", "gptq"], 2, "--method bnb-nf4 writes --format bitsandbytes"),
        (["--method", "awq", "--format", "awq", "--bits", "3"], 2, "--format awq stores asymmetric 4-bit"),
        (["--method", "rtn", "--act-order"], 2, "--act-order applies to --method gptq only"),
        (["--calib", "SMALL", "--calib-samples", "4", "--group-size", "32"], 3, "small.jsonl has"),
    ],
)
def test_bad_requests_fail_with_one_line_and_no_output(cli, tiny_model, tmp_path, args, code, message):
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": "too short"}])
    args = [str(small) if a == "SMALL" else a for a in args]
    out = tmp_path / "out"
    result = cli("quantize", tiny_model, *args, "-o", out)
    assert result.exit_code == code, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_existing_output_is_refused_without_force(cli, tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = cli("quantize", tiny_model, "--method", "rtn", "-o", out, *FAST)
    assert result.exit_code != 0 and "exists" in result.stderr
    assert cli("quantize", tiny_model, "--method", "rtn", "-o", out, "--force", *FAST).exit_code == 0
    assert (out / "model.safetensors").is_file()


def test_help_ends_with_runnable_examples():
    assert EPILOG.startswith("Examples:") and "llmctl quantize " in EPILOG


def test_llmctl_eval_scores_a_quantized_model_close_to_the_original(cli, tiny_model, tmp_path):
    out = tmp_path / "rtn"
    assert cli("quantize", tiny_model, "--method", "rtn", "--bits", "8", "-o", out, *FAST).exit_code == 0
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    scores = {}
    for name, model in (("fp", tiny_model), ("q8", out)):
        result = cli("eval", model, "--task", "perplexity", "--data", text, "--max-length", "64", "--json")
        assert result.exit_code == 0, result.stderr
        scores[name] = json.loads(result.stdout)["results"]["perplexity"]["byte_perplexity,none"]
    assert scores["q8"] == pytest.approx(scores["fp"], rel=0.02)  # 8-bit RTN barely moves perplexity


def test_gptq_without_true_sequential_calibrates_each_layer_in_one_pass(cli, tiny_model, tmp_path):
    out = tmp_path / "gptq"
    result = cli("quantize", tiny_model, "--method", "gptq", "--no-true-sequential", "-o", out, *FAST)
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["quantization_config"]["true_sequential"] is False
