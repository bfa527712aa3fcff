"""Training in several processes (``--nproc N``, or any ``torchrun`` launch): ``--strategy ddp|fsdp``.

Every process reads the whole data set in the same seeded order; each optimizer step's units are split into
one contiguous share per process. Losses are divided by the step's *global* item count and the gradients
summed across processes, so N processes follow the same loss curve as one process with the same global
batch. Only rank 0 writes checkpoints and the output. CPU uses the gloo backend, CUDA nccl (one GPU per
process, ``LOCAL_RANK``).

- ``ddp`` (the default): every process holds the whole model; the gradients are summed by an all-reduce
  after the step's backward passes (``Trainer.accumulate``).
- ``fsdp``: the model is sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``): each decoder layer,
  then the root. Parameters, gradients and optimizer states are DTensors holding 1/N of each tensor; FSDP
  reduce-scatters the gradients itself, set here to *sum* (gradient divide factor 1, plain SUM collectives:
  gloo has no pre-multiplied sum) so that the loss normalisation above still holds. Frozen base weights
  shard like the rest (LoRA/DoRA train only their adapters). Checkpoints and the output gather full
  tensors onto rank 0, so they have the same format as one process's (a checkpoint written under one
  strategy loads under the other, or in one process). QLoRA (bitsandbytes 4-bit storage) and fp16 loss
  scaling (each process would see only its own shards' overflows) are refused; with one process,
  ``fsdp`` trains unsharded with a warning.

Multi-node: on every node run torchrun on this module with the llmctl arguments as a JSON list in
``LLMCTL_TORCHRUN_ARGV`` (torchrun's own parser would mistake llmctl options such as ``--r`` for
abbreviations of its own), e.g. ``LLMCTL_TORCHRUN_ARGV='["finetune", "base", "train.jsonl", "-o", "out",
"--strategy", "fsdp"]' torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500
-m llmctl.core.finetune.distributed``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from llmctl.core.errors import UsageError

STRATEGIES = ("ddp", "fsdp")


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def check_strategy(strategy: str, *, processes: int, method: str, mixed_precision: str) -> None:
    """Refuse a ``--strategy`` that does not exist or cannot run these settings (before anything starts)."""
    if strategy not in STRATEGIES:
        raise UsageError(f"unknown --strategy {strategy!r}; choose {' or '.join(STRATEGIES)}")
    if strategy != "fsdp" or processes < 2:
        return
    if method == "qlora":
        raise UsageError("--strategy fsdp cannot shard QLoRA's 4-bit weights; use --strategy ddp")
    if mixed_precision == "fp16":
        raise UsageError(
            "--strategy fsdp does not support --mixed-precision fp16 (the loss scaler would see only this "
            "process's shards); use bf16"
        )


ARGV_ENV = "LLMCTL_TORCHRUN_ARGV"


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``llmctl <argv>`` as ``nproc`` processes under torch.distributed.run; returns its exit code.

    The arguments travel in an environment variable, not on torchrun's command line, where its own
    parser would take llmctl's options for abbreviations of its own (``--r`` for ``--rdzv-backend``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "llmctl.core.finetune.distributed"]  # fmt: skip
    env = {**os.environ, ARGV_ENV: json.dumps(argv)}
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(cmd, env=env).returncode


def init(device):
    """Join the process group when launched by torchrun; returns the device this process trains on."""
    import torch

    if not under_torchrun() or torch.distributed.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def barrier_and_close() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# -- FSDP --------------------------------------------------------------------------------------------------
def decoder_layers(model):
    """The model's decoder layers (quantize.calib's lookup), through a PEFT wrapper; [] if it has none."""
    from llmctl.core.errors import ModelError
    from llmctl.core.quantize.calib import decoder_layers as find

    try:
        return find(model.get_base_model() if hasattr(model, "get_base_model") else model)
    except ModelError:
        return []


def shard(model) -> int:
    """Shard ``model`` in place with FSDP2: every decoder layer, then the root. Gradients are reduced as a
    sum, not a mean (the losses are already divided by the global item count). Returns the layer count."""
    import torch

    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:
        FSDPModule = None  # noqa: N806
    if not hasattr(FSDPModule, "set_force_sum_reduction_for_comms"):
        raise UsageError(f"--strategy fsdp needs torch >= 2.8 (FSDP2 with sum-reduced gradients); this is "
                         f"torch {torch.__version__}: use --strategy ddp")  # fmt: skip
    layers = decoder_layers(model)
    if not layers:
        raise UsageError(
            "--strategy fsdp: no decoder layer list (model.layers) found in this model; use --strategy ddp"
        )
    for layer in reversed(layers):  # innermost first, should one block class contain another
        fully_shard(layer)
    fully_shard(model)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    return len(layers)


def _dtensor_class():
    """torch's DTensor class, or None (a torch built without torch.distributed, or older than FSDP2)."""
    import torch

    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def is_sharded(model) -> bool:
    """Whether ``model`` was sharded by :func:`shard` (its root is an FSDP2 module)."""
    if _dtensor_class() is None:
        return False
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def reshard(model) -> None:
    """Put every FSDP module's parameters back into shards. A forward without backward (validation) leaves
    the root's unsharded (FSDP2 reshards the root only after backward), and then ``named_parameters()`` would
    not be the sharded parameters the optimizer holds."""
    if not is_sharded(model):
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_tensor(tensor):
    """A DTensor's whole value (a collective: every process must call it); any other tensor as it is."""
    dtensor = _dtensor_class()
    return tensor.full_tensor() if dtensor is not None and isinstance(tensor, dtensor) else tensor


def full_state(named: dict, *, rank: int) -> dict:
    """``{name: whole tensor on the CPU}`` on rank 0, ``{}`` elsewhere; shards are gathered one tensor at a
    time, so every process must call it with the same names."""
    out = {}
    for name, tensor in named.items():
        whole = full_tensor(tensor.detach())
        if rank == 0:
            out[name] = whole.cpu()
    return out


def shaped_like(whole, param):
    """``whole`` (a full tensor) laid out like ``param``: this process's shard when ``param`` is a DTensor
    (every process holds ``whole``, so nothing is sent)."""
    dtensor = _dtensor_class()
    if dtensor is None or not isinstance(param, dtensor) or isinstance(whole, dtensor):
        return whole
    from torch.distributed.tensor import distribute_tensor

    whole = whole.to(device=param.device, dtype=param.dtype)
    return distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)


def _optimizer_names(model, optimizer) -> list[str]:
    """The parameter name of each optimizer index (the integer keys of ``optimizer.state_dict()``)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state(model, optimizer, *, rank: int) -> dict | None:
    """``optimizer.state_dict()`` as one process has it; for a sharded model the states are gathered onto
    rank 0 (``None`` elsewhere; every process must call it) and keyed by index again, so the checkpoint has
    the same format under every strategy."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_optimizer_state_dict(model, optimizer, options=options)
    if rank != 0:
        return None
    index = {name: i for i, name in enumerate(_optimizer_names(model, optimizer))}
    return {
        "state": {index[name]: value for name, value in full["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]],
    }


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """The inverse of :func:`optimizer_state` (every process holds ``state``; each keeps its shards)."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _optimizer_names(model, optimizer)
    by_name = {
        "state": {names[int(i)]: value for i, value in state["state"].items()},
        "param_groups": [
            {**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]
        ],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


if __name__ == "__main__":  # a worker started by launch(): run the llmctl command it was given
    from llmctl.cli import main

    main(json.loads(os.environ[ARGV_ENV]))
