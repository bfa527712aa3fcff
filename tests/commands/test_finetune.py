"""llmctl finetune through the CLI: outputs, adapter reload and merge, --config, errors and exit codes."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import read_jsonl, run_llmctl, write_jsonl

PC = [{"prompt": f"Q{i}: {i}+{i}=", "completion": f" {2 * i}"} for i in range(10)]
QUICK = ["--max-steps", "2", "--batch-size", "4", "--device", "cpu", "--quiet"]


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", PC)


def test_lora_run_writes_adapter_metrics_plot_and_provenance_and_merges(cli, tiny_model, data, tmp_path):
    out = tmp_path / "out"
    flags = ["--r", "4", "--val-split", "0.2", "--merge", "--json", "--lr", "5e-2"]
    result = cli("finetune", tiny_model, data, "-o", out, *flags, *QUICK)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["steps"] == 2 and summary["format"] == "prompt-completion" and summary["merged"]
    assert summary["train_examples"] == 8 and summary["val_examples"] == 2
    rows = read_jsonl((out / "metrics.jsonl").read_text())
    assert [r["step"] for r in rows] == [1, 2] and "val_loss" in rows[-1]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_mb"} <= set(rows[0])
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    provenance = json.loads((out / "llmctl.json").read_text())
    assert provenance["command"] == "finetune" and provenance["finetune"]["r"] == 4
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 6, 7, 8, 9]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        before = base(ids).logits
        adapted = PeftModel.from_pretrained(base, out / "adapter").eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(before, adapted, atol=1e-4)  # training changed something


def test_config_yaml_gives_defaults_and_flags_win(cli, tiny_model, data, tmp_path):
    config = tmp_path / "ft.yaml"
    config.write_text("method: lora\nr: 2\nmax-steps: 3\ntarget_modules: q_proj,v_proj\nbatch-size: 4\n")
    out = tmp_path / "out"
    result = cli("finetune", tiny_model, data, "-o", out, "--config", config, "--max-steps", "1", "--quiet")
    assert result.exit_code == 0, result.stderr
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_full_finetuning_from_stdin_writes_a_full_model(cli, tiny_model, data, tmp_path):
    out = tmp_path / "full"
    result = cli("finetune", tiny_model, "-", "-o", out, "--method", "full", *QUICK, input=data.read_text())
    assert result.exit_code == 0, result.stderr
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()


@pytest.mark.parametrize(
    ("records", "flags", "code", "message"),
    [
        ([{"prompt": "p", "chosen": "a"}], ["--objective", "dpo"], 3, r"cannot tell|rejected"),
        (
            [{"prompt": "p", "chosen": "a", "rejected": ""}],
            ["--objective", "dpo"],
            3,
            r"train.jsonl:1: .*'rejected'",
        ),
        (PC, ["--objective", "dpo"], 3, "needs preference records"),
        (PC, ["--target-modules", "nope"], 2, "unknown --target-modules nope; .*q_proj"),
        (PC, ["--pack"], 2, "--pack needs --max-length"),
        (PC, ["--method", "bogus"], 2, "unknown --method 'bogus'"),
        ([{"prompt": "a very long prompt", "completion": "x"}], ["--max-length", "4"], 3, "every label"),
    ],
)
def test_bad_input_and_flags_are_one_line_errors(cli, tiny_model, tmp_path, records, flags, code, message):
    import re

    data = write_jsonl(tmp_path / "train.jsonl", records)
    out = tmp_path / "out"
    result = cli("finetune", tiny_model, data, "-o", out, *flags, *QUICK)
    assert result.exit_code == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmctl finetune: error: ")
    assert re.search(message, lines[0])
    assert not out.exists()


def test_an_existing_output_is_refused_and_kept(cli, tiny_model, data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = cli("finetune", tiny_model, data, "-o", out, *QUICK)
    assert result.exit_code == 2
    assert (out / "keep.txt").read_text() == "mine"


def test_two_data_parallel_processes_follow_one_process_with_the_same_global_batch(
    cli, tiny_model, data, tmp_path
):
    common = ["--max-steps", "3", "--dropout", "0", "--lr", "1e-2", "--device", "cpu", "--quiet"]
    one = cli("finetune", tiny_model, data, "-o", tmp_path / "one", "--batch-size", "4", *common)
    assert one.exit_code == 0, one.stderr
    # --r travels to the workers intact (torchrun's own parser would read it as an abbreviation)
    flags = ["--nproc", "2", "--strategy", "ddp", "--batch-size", "2", "--r", "16", "--json"]
    two = run_llmctl("finetune", tiny_model, data, "-o", tmp_path / "two", *flags, *common)
    assert two.returncode == 0, two.stderr.decode()[-2000:]
    summary = json.loads(two.stdout)  # only rank 0 reports
    assert summary["processes"] == 2
    a = read_jsonl((tmp_path / "one" / "metrics.jsonl").read_text())
    b = read_jsonl((tmp_path / "two" / "metrics.jsonl").read_text())
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5)
    assert len({r["loss"] for r in a}) == 3
