"""The training loop: accumulation, exact resume, early stopping, preference objectives, optimizers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llmctl.core.errors import LlmctlError, UsageError
from llmctl.core.finetune.config import FinetuneConfig
from llmctl.core.finetune.optim import Lion, lr_factor, make_optimizer
from llmctl.core.finetune.run import build, finetune
from tests.conftest import write_jsonl

PC = [{"prompt": f"Q{i} " + "x" * (i % 5), "completion": f" answer {i}" + "!" * (i % 3)} for i in range(12)]
PREFS = [{"prompt": f"Say {i}", "chosen": f" yes {i}", "rejected": f" no no {i}"} for i in range(8)]


@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", PC)


@pytest.fixture
def prefs(tmp_path) -> Path:
    return write_jsonl(tmp_path / "prefs.jsonl", PREFS)


def cfg_for(tiny_model, train: Path, out: Path, **kw) -> FinetuneConfig:
    base = {
        "base": str(tiny_model),
        "train": str(train),
        "output": str(out),
        "device": "cpu",
        "log_every": 1000,
    }
    return FinetuneConfig(**{**base, **kw})


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulated_loss_and_gradients_equal_one_big_batch(tiny_model, data, tmp_path):
    results = []
    for batch_size, accum in ((8, 1), (4, 2), (1, 8)):
        sizes = {"batch_size": batch_size, "grad_accum": accum}
        cfg = cfg_for(tiny_model, data, tmp_path / "o", method="full", shuffle=False, max_steps=1, **sizes)
        trainer = build(cfg).trainer
        loss, items, _ = trainer.accumulate(trainer.micro_batches(0))
        results.append((loss, items, grads(trainer.model), trainer))
    (loss0, items0, g0, t0), *rest = results
    for loss, items, g, _ in rest:
        assert items == items0
        assert loss == pytest.approx(loss0, rel=1e-5)
        for name in g0:
            torch.testing.assert_close(g[name], g0[name], rtol=1e-4, atol=1e-6)
    # the naive mean of per-micro-batch means differs (examples have unequal numbers of trained tokens)
    from llmctl.core.finetune.batching import collate_units
    from llmctl.core.finetune.objectives import batch_loss

    t0.model.zero_grad()
    naive = []
    with torch.no_grad():
        for unit in t0.train_units[:8]:  # the examples of the first step, one at a time
            one = collate_units([unit], t0.pad_id, pack=False)
            s, n, _ = batch_loss(t0.objective, t0.model, one, beta=0, gamma=0, label_smoothing=0)
            naive.append(float(s) / n)
    assert sum(naive) / len(naive) != pytest.approx(loss0, rel=1e-4)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


RESUME = {"max_steps": 4, "batch_size": 2, "grad_accum": 2, "lr": 1e-2, "dropout": 0.1, "neftune_alpha": 5.0,
          "warmup_ratio": 0.25}  # fmt: skip


@pytest.fixture(scope="module")
def straight_run(tiny_model, tmp_path_factory) -> tuple[Path, Path, dict]:
    """4 steps with a checkpoint at step 2. 12 examples, 4 per step: 3 steps per epoch, so the run crosses an
    epoch boundary; dropout and NEFTune draw random numbers, so RNG states must be restored too."""
    tmp = tmp_path_factory.mktemp("resume")
    data = write_jsonl(tmp / "train.jsonl", PC)
    summary = finetune(cfg_for(tiny_model, data, tmp / "a", save_every=2, **RESUME))
    return tmp, data, summary


def test_resume_continues_the_loss_curve_bit_for_bit(tiny_model, straight_run):
    tmp, data, straight = straight_run
    checkpoints = sorted((tmp / "a-checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-000002"]
    resumed = finetune(cfg_for(tiny_model, data, tmp / "c", resume=str(checkpoints[0]), **RESUME))
    a, c = read_metrics(tmp / "a"), read_metrics(tmp / "c")
    assert [r["loss"] for r in a] == [r["loss"] for r in c]  # exact equality, restored history included
    assert [r["grad_norm"] for r in a[2:]] == [r["grad_norm"] for r in c[2:]]
    assert len({r["loss"] for r in a}) == 4
    assert straight["final_loss"] == resumed["final_loss"]
    assert (tmp / "a" / "adapter_model.safetensors").read_bytes() == (
        tmp / "c" / "adapter_model.safetensors"
    ).read_bytes()


def test_resume_from_the_checkpoint_directory_takes_the_latest_and_needs_its_rng_state(
    tiny_model, straight_run
):
    tmp, data, _ = straight_run
    run = build(cfg_for(tiny_model, data, tmp / "d", resume=str(tmp / "a-checkpoints"), **RESUME))
    assert run.trainer.state.step == 2
    torch.manual_seed(12345)  # without the restored RNG state, dropout draws differ: the check above can fail
    assert run.trainer.train_step(2)["loss"] != read_metrics(tmp / "a")[2]["loss"]


def test_resume_with_incompatible_flags_is_refused(tiny_model, straight_run):
    tmp, data, _ = straight_run
    with pytest.raises(UsageError, match=r"cannot --resume .*r: 16 -> 8"):
        build(cfg_for(tiny_model, data, tmp / "e", **{**RESUME, "r": 8}, resume=str(tmp / "a-checkpoints")))


def test_early_stopping_keeps_the_best_weights(tiny_model, data, tmp_path):
    # a learning rate this large makes validation loss rise after the first steps
    cfg = cfg_for(tiny_model, data, tmp_path / "o", method="full", lr=0.5, optimizer="lion", max_steps=8,
                  batch_size=2, val_split=0.25, eval_every=1, patience=2, max_grad_norm=0)  # fmt: skip
    run = build(cfg)
    state = run.trainer.fit()
    vals = [r["val_loss"] for r in state.history]
    assert state.stopped_early and state.step < 8
    assert state.best_val == min(vals) and vals[-1] > state.best_val
    assert run.trainer.evaluate() == pytest.approx(state.best_val, rel=1e-6)


def test_dpo_starts_at_log_2_with_lora_and_with_full_finetuning(tiny_model, prefs, tmp_path):
    for method in ("lora", "full"):
        run = build(
            cfg_for(tiny_model, prefs, tmp_path / method, method=method, objective="dpo", max_steps=2)
        )
        row = run.trainer.train_step(0)
        assert row["loss"] == pytest.approx(math.log(2), abs=1e-5), method  # policy == reference at step 0
        assert row["reward_margin"] == pytest.approx(0.0, abs=1e-6)
        second = run.trainer.train_step(1)
        assert second["loss"] != pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_reference_free_preference_objectives_train(tiny_model, prefs, tmp_path, objective):
    summary = finetune(cfg_for(tiny_model, prefs, tmp_path / "o", objective=objective, max_steps=2, lr=1e-2))
    rows = read_metrics(tmp_path / "o")
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    assert "reward_margin" in rows[0] and summary["objective"] == objective


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_model, data, tmp_path):
    out = []
    for gc in (False, True):
        trainer = build(cfg_for(tiny_model, data, tmp_path / "o", method="full", gradient_checkpointing=gc,
                                shuffle=False)).trainer  # fmt: skip
        trainer.model.train()
        loss, _, _ = trainer.accumulate(trainer.micro_batches(0))
        out.append((loss, grads(trainer.model)))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-6)
    for name, g in out[0][1].items():
        torch.testing.assert_close(out[1][1][name], g, rtol=1e-5, atol=1e-7)


def test_neftune_adds_noise_only_in_training(tiny_model, data, tmp_path):
    losses = {}
    for alpha in (0.0, 50.0):
        trainer = build(cfg_for(tiny_model, data, tmp_path / "o", neftune_alpha=alpha, shuffle=False)).trainer
        trainer.model.train()
        losses[alpha] = (trainer.accumulate(trainer.micro_batches(0))[0], trainer)
    assert losses[0.0][0] != pytest.approx(losses[50.0][0], rel=1e-4)
    batch = losses[50.0][1].micro_batches(0)[0]  # NEFTune keeps padded rows
    with torch.no_grad():
        evals = []
        for _, trainer in losses.values():
            trainer.model.eval()
            evals.append(
                trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            )
    torch.testing.assert_close(evals[0], evals[1])


def test_packed_training_runs_and_reports_fewer_rows(tiny_model, data, tmp_path):
    run = build(cfg_for(tiny_model, data, tmp_path / "o", pack=True, max_length=64, batch_size=1))
    assert len(run.trainer.train_units) < len(PC)
    row = run.trainer.train_step(0)
    assert math.isfinite(row["loss"])


def test_unknown_target_module_lists_the_available_ones(tiny_model, data, tmp_path):
    with pytest.raises(UsageError, match=r"unknown --target-modules qq_proj.*q_proj.*v_proj"):
        build(cfg_for(tiny_model, data, tmp_path / "o", target_modules="q_proj,qq_proj"))


def test_rslora_and_dora_configure_peft(tiny_model, data, tmp_path):
    run = build(cfg_for(tiny_model, data, tmp_path / "o", method="dora", rslora=True, r=4, alpha=8))
    config = run.model.peft_config["default"]
    assert config.use_dora and config.use_rslora
    layer = run.model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))


def test_qlora_and_8bit_adamw_without_bitsandbytes_fail_clearly(tiny_model, data, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(LlmctlError, match="qlora needs bitsandbytes, which is not installed"):
        build(cfg_for(tiny_model, data, tmp_path / "o", method="qlora"))
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(LlmctlError, match="adamw-8bit needs bitsandbytes"):
        make_optimizer("adamw-8bit", [p], lr=1e-3, weight_decay=0, device=torch.device("cpu"))


def test_paged_adamw_needs_cuda():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(LlmctlError, match="paged-adamw .* needs CUDA"):
        make_optimizer("paged-adamw", [p], lr=1e-3, weight_decay=0, device=torch.device("cpu"))


def test_qlora_trains_nf4_on_the_cpu_and_merges_into_a_full_precision_base(tiny_model, data, tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is an optional dependency")
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    cfg = cfg_for(tiny_model, data, tmp_path / "q", method="qlora", optimizer="adamw-8bit", merge=True,
                  max_steps=2, lr=1e-2)  # fmt: skip
    run = build(cfg)
    q_proj = run.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.quant_type == "nf4"
    assert q_proj.weight.quant_state.nested  # double quantization
    finetune(cfg_for(tiny_model, data, tmp_path / "q2", method="qlora", merge=True, max_steps=2, lr=1e-2))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "q2")
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert (tmp_path / "q2" / "adapter" / "adapter_model.safetensors").is_file()


def test_schedules_warm_up_then_decay():
    assert [lr_factor(s, total=10, warmup=2, kind="constant") for s in (0, 1, 5)] == [0.5, 1.0, 1.0]
    assert lr_factor(2, total=10, warmup=2, kind="cosine") == pytest.approx(1.0)
    assert lr_factor(6, total=10, warmup=2, kind="cosine") == pytest.approx(0.5)
    assert lr_factor(6, total=10, warmup=2, kind="linear") == pytest.approx(0.5)
    assert lr_factor(10, total=10, warmup=2, kind="linear") == pytest.approx(0.0)


def test_lion_step_is_the_sign_of_the_interpolated_momentum():
    p = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.5]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.1)
    p.grad = torch.tensor([0.3, -0.2, 0.0])
    opt.step()
    # m = 0: update = sign(0.1 * g) = [1, -1, 0]; decay first: p * (1 - 0.01)
    torch.testing.assert_close(p.data, torch.tensor([0.99 - 0.1, -0.99 + 0.1, 0.495]))
    torch.testing.assert_close(opt.state[p]["exp_avg"], 0.01 * torch.tensor([0.3, -0.2, 0.0]))


@pytest.mark.parametrize("optimizer", ["adafactor", "lion"])
def test_other_optimizers_lower_the_loss(tiny_model, data, tmp_path, optimizer):
    cfg = cfg_for(tiny_model, data, tmp_path / "o", method="full", optimizer=optimizer, lr=1e-2, max_steps=4,
                  batch_size=12, scheduler="constant")  # fmt: skip
    state = build(cfg).trainer.fit()
    assert state.history[-1]["loss"] < state.history[0]["loss"]


def test_bf16_mixed_precision_trains(tiny_model, data, tmp_path):
    state = build(
        cfg_for(tiny_model, data, tmp_path / "o", mixed_precision="bf16", max_steps=2)
    ).trainer.fit()
    assert all(math.isfinite(r["loss"]) for r in state.history)


def test_kernels_hook_calls_patch_model_on_the_base_model(tiny_model, data, tmp_path, monkeypatch):
    import llmctl.kernels

    seen = []

    class Summary:
        def as_dict(self):
            return {"patched": {"rms_norm": 5}}

    monkeypatch.setattr(
        llmctl.kernels, "patch_model", lambda model: seen.append(model) or Summary(), raising=False
    )
    run = build(cfg_for(tiny_model, data, tmp_path / "o", kernels=True))
    assert len(seen) == 1 and seen[0].config.model_type == "llama"
    assert run.kernels == {"patched": {"rms_norm": 5}}
    assert build(cfg_for(tiny_model, data, tmp_path / "o")).kernels is None and len(seen) == 1


def test_fp16_mixed_precision_uses_loss_scaling(tiny_model, data, tmp_path):
    trainer = build(cfg_for(tiny_model, data, tmp_path / "o", mixed_precision="fp16", max_steps=2)).trainer
    assert trainer.scaler is not None
    state = trainer.fit()
    assert all(math.isfinite(r["loss"]) for r in state.history)
    assert trainer.scaler.get_scale() > 1


@pytest.mark.parametrize("objective", ["sft", "simpo"])
def test_logits_at_trained_positions_only_equal_the_full_logits_reference(
    tiny_model, data, prefs, tmp_path, objective
):
    from llmctl.core.finetune.objectives import batch_loss

    train = data if objective == "sft" else prefs
    cfg = cfg_for(tiny_model, train, tmp_path / "o", method="full", objective=objective, shuffle=False)
    trainer = build(cfg).trainer
    batch = trainer.micro_batches(0)[0]
    results = []
    for reference in (False, True):
        trainer.model.zero_grad()
        settings = {"beta": 2.0, "gamma": 0.5, "label_smoothing": 0.1, "reference": reference}
        loss, n, _ = batch_loss(trainer.objective, trainer.model, batch, **settings)
        loss.backward()
        results.append((loss.detach(), n, grads(trainer.model)))
    (fast, n_fast, g_fast), (ref, n_ref, g_ref) = results
    assert n_fast == n_ref
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    assert g_fast.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=1e-4, atol=1e-6)


def test_kernels_flag_with_the_real_kernels_trains_the_same_loss_curve(
    tiny_model, data, tmp_path, monkeypatch
):
    """--kernels through llmctl's Triton RMSNorm/RoPE/SwiGLU (the CPU interpreter here, CUDA on a GPU)."""
    plain = build(cfg_for(tiny_model, data, tmp_path / "a", max_steps=2)).trainer.fit()
    monkeypatch.setenv("LLMCTL_KERNELS", "triton")
    run = build(cfg_for(tiny_model, data, tmp_path / "b", max_steps=2, kernels=True))
    assert run.kernels["patched"]["rms_norm"] > 0 and run.kernels["patched"]["swiglu"] > 0
    patched = run.trainer.fit()
    assert [r["loss"] for r in patched.history] == pytest.approx([r["loss"] for r in plain.history], rel=1e-4)


def test_fsdp_shards_each_decoder_layer_found_through_the_peft_wrapper(tiny_model, data, tmp_path):
    from llmctl.core.finetune.distributed import decoder_layers

    model = build(cfg_for(tiny_model, data, tmp_path / "o", method="dora", max_steps=1)).model
    layers = decoder_layers(model)
    assert [type(m).__name__ for m in layers] == ["LlamaDecoderLayer"] * 2
    assert layers[0] is model.base_model.model.model.layers[0]


def test_sft_batches_are_padding_free_and_train_like_padded_ones(tiny_model, data, tmp_path):
    from llmctl.core.models.varlen import VARLEN_ATTENTION

    cfg = dict(method="full", shuffle=False, max_steps=1, dropout=0.0, batch_size=4)
    flat = build(cfg_for(tiny_model, data, tmp_path / "a", **cfg)).trainer
    assert flat.padding_free and flat.model.config._attn_implementation == VARLEN_ATTENTION
    batches = flat.micro_batches(0)
    assert batches[0]["input_ids"].shape[0] == 1 and "attention_mask" not in batches[0]
    padded = build(cfg_for(tiny_model, data, tmp_path / "b", **cfg)).trainer
    padded.padding_free = False
    assert padded.micro_batches(0)[0]["input_ids"].shape[0] == 4
    a, b = flat.train_step(0), padded.train_step(0)
    assert a["tokens"] == b["tokens"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
