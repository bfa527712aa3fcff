"""llmctl finetune --strategy fsdp: two FSDP2 processes (gloo, CPU) follow one process with the same global
batch; their outputs and checkpoints are one process's, and a resumed run continues the curve."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import Cli, read_jsonl, run_llmctl, write_jsonl

PC = [{"prompt": f"Q{i}: {i}+{i}=", "completion": f" {2 * i}"} for i in range(10)]
VAL = [{"prompt": f"Q{i}: {i}+{i}=", "completion": f" {2 * i}"} for i in range(10, 13)]
# 10 examples, 4 a step: the 3rd step holds 2, all in the first process's share, so the second process runs
# a filler pass weighted 0 (FSDP's collectives must pair up); step 4 starts the next epoch
COMMON = ["--max-steps", "4", "--dropout", "0", "--lr", "1e-2", "--device", "cpu", "--quiet"]
FSDP = ["--nproc", "2", "--strategy", "fsdp", "--batch-size", "2"]


def metrics(directory: Path) -> list[dict]:
    return read_jsonl((directory / "metrics.jsonl").read_text())


def assert_same_curve(one: list[dict], two: list[dict]) -> None:
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]
    for x, y in zip(one, two, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5)
        assert ("val_loss" in y) == ("val_loss" in x)
        if "val_loss" in x:
            assert y["val_loss"] == pytest.approx(x["val_loss"], rel=1e-6)
    assert len({r["loss"] for r in one}) == len(one)


def assert_close_tensors(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=atol)


@pytest.fixture(scope="module")
def lora(tiny_model, tmp_path_factory) -> dict:
    """One process (batch 4) and two FSDP processes (2 each), LoRA, validation every 2 steps, a checkpoint at
    step 2 from each."""
    tmp = tmp_path_factory.mktemp("fsdp")
    data, val = write_jsonl(tmp / "train.jsonl", PC), write_jsonl(tmp / "val.jsonl", VAL)
    flags = [*COMMON, "--val", val, "--eval-every", "2", "--save-every", "2"]
    one = Cli()("finetune", tiny_model, data, "-o", tmp / "one", "--batch-size", "4", *flags)
    assert one.exit_code == 0, one.stderr
    two = run_llmctl("finetune", tiny_model, data, "-o", tmp / "two", *FSDP, *flags, "--json")
    assert two.returncode == 0, two.stderr.decode()[-3000:]
    return {"tmp": tmp, "data": data, "val": val, "flags": flags, "summary": json.loads(two.stdout)}


def test_fsdp_lora_follows_one_process_with_the_same_global_batch(lora):
    tmp = lora["tmp"]
    assert lora["summary"]["processes"] == 2  # only rank 0 reports
    one, two = metrics(tmp / "one"), metrics(tmp / "two")
    assert_same_curve(one, two)
    assert one[2]["tokens"] < one[0]["tokens"] and "val_loss" in two[1] and "val_loss" in two[3]


def test_fsdp_lora_adapter_equals_one_process_and_reloads(lora, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tmp = lora["tmp"]
    one = load_file(tmp / "one" / "adapter_model.safetensors")
    two = load_file(tmp / "two" / "adapter_model.safetensors")
    assert_close_tensors(one, two, atol=1e-4)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    logits = []
    for out in ("one", "two"):
        base = AutoModelForCausalLM.from_pretrained(tiny_model)
        with torch.no_grad():
            logits.append(PeftModel.from_pretrained(base, tmp / out).eval()(ids).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)


def test_fsdp_checkpoint_has_the_one_process_format_and_resumes_the_curve(lora, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tmp = lora["tmp"]
    one_ckpt, two_ckpt = tmp / "one-checkpoints" / "step-000002", tmp / "two-checkpoints" / "step-000002"
    assert sorted(p.name for p in two_ckpt.iterdir()) == sorted(p.name for p in one_ckpt.iterdir())
    assert_close_tensors(
        load_file(one_ckpt / "trainable.safetensors"), load_file(two_ckpt / "trainable.safetensors"), 1e-4
    )
    optim = [torch.load(c / "optimizer.pt", weights_only=False)["optimizer"] for c in (one_ckpt, two_ckpt)]
    assert optim[1]["param_groups"] == optim[0]["param_groups"]  # integer parameter keys, as one process
    assert optim[1]["state"].keys() == optim[0]["state"].keys()
    for i, state in optim[0]["state"].items():
        assert type(optim[1]["state"][i]["exp_avg"]) is torch.Tensor  # gathered, not DTensor shards
        torch.testing.assert_close(optim[1]["state"][i]["exp_avg"], state["exp_avg"], rtol=0, atol=1e-6)

    # resume the FSDP run from its checkpoint, merging the adapter at the end this time
    out = tmp / "resumed"
    flags = [*FSDP, *lora["flags"], "--resume", tmp / "two-checkpoints", "--merge"]
    resumed = run_llmctl("finetune", tiny_model, lora["data"], "-o", out, *flags)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    straight = metrics(tmp / "two")
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in straight]
    assert [r["grad_norm"] for r in metrics(out)] == [r["grad_norm"] for r in straight]
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == (
        tmp / "two" / "adapter_model.safetensors"
    ).read_bytes()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model)
        adapted = PeftModel.from_pretrained(base, out / "adapter").eval()(ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)


def test_fsdp_full_finetuning_follows_one_process_and_writes_the_same_model(tiny_model, tmp_path):
    data, val = write_jsonl(tmp_path / "train.jsonl", PC), write_jsonl(tmp_path / "val.jsonl", VAL)
    # gradients above --max-grad-norm 1: clipped. Validation before each checkpoint: a forward without
    # backward leaves FSDP's root (embeddings, head: trained here) unsharded, and the gathering must cope
    flags = [*COMMON, "--method", "full", "--max-steps", "3", "--val", val, "--eval-every", "1"]
    flags += ["--save-every", "2"]
    one = Cli()("finetune", tiny_model, data, "-o", tmp_path / "one", "--batch-size", "4", *flags)
    assert one.exit_code == 0, one.stderr
    two = run_llmctl("finetune", tiny_model, data, "-o", tmp_path / "two", *FSDP, *flags)
    assert two.returncode == 0, two.stderr.decode()[-3000:]
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert_same_curve(a, b)
    assert all(r["grad_norm"] > 1 for r in a)
    models = [load_file(tmp_path / out / "model.safetensors") for out in ("one", "two")]
    assert_close_tensors(*models, atol=1e-4)
    checkpoints = [
        load_file(tmp_path / f"{out}-checkpoints" / "step-000002" / "best.safetensors")
        for out in ("one", "two")
    ]
    assert_close_tensors(*checkpoints, atol=1e-4)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "two")
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (64, 64)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--strategy", "zero3"], r"unknown --strategy 'zero3'; choose ddp or fsdp"),
        (["--strategy", "fsdp", "--method", "qlora"], r"--strategy fsdp cannot shard QLoRA"),
        (["--strategy", "fsdp", "--mixed-precision", "fp16"], r"does not support --mixed-precision fp16"),
    ],
)
def test_impossible_strategies_are_one_line_usage_errors_before_any_process_starts(
    cli, tiny_model, tmp_path, flags, message
):
    data = write_jsonl(tmp_path / "train.jsonl", PC)
    result = cli("finetune", tiny_model, data, "-o", tmp_path / "out", "--nproc", "2", *flags, *COMMON)
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmctl finetune: error: ")
    assert re.search(message, lines[0])
    assert not (tmp_path / "out").exists()


def test_fsdp_with_one_process_warns_and_trains_unsharded(cli, tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", PC)
    flags = ["--strategy", "fsdp", "--max-steps", "1", "--device", "cpu"]
    result = cli("finetune", tiny_model, data, "-o", tmp_path / "out", *flags)
    assert result.exit_code == 0, result.stderr
    assert "warning: --strategy fsdp with one process" in result.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
