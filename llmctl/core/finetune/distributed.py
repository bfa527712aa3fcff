"""Data-parallel training over several processes (``--nproc N``, or any ``torchrun`` launch).

Every process holds the whole model and reads the whole data set in the same seeded order; each optimizer
step's units are split into one contiguous share per process. Losses are divided by the step's *global*
item count and the gradients summed across processes (an all-reduce after the backward passes), so N
processes follow the same loss curve as one process with the same global batch. Only rank 0 writes
checkpoints and the output. CPU uses the gloo backend, CUDA nccl (one GPU per process, ``LOCAL_RANK``).

Multi-node: on every node run torchrun on this module with the llmctl arguments as a JSON list in
``LLMCTL_TORCHRUN_ARGV`` (torchrun's own parser would mistake llmctl options such as ``--r`` for
abbreviations of its own), e.g. ``LLMCTL_TORCHRUN_ARGV='["finetune", "base", "train.jsonl", "-o", "out"]'
torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500
-m llmctl.core.finetune.distributed``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


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


if __name__ == "__main__":  # a worker started by launch(): run the llmctl command it was given
    from llmctl.cli import main

    main(json.loads(os.environ[ARGV_ENV]))
