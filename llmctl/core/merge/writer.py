"""Streaming sharded safetensors: the headers are written first, then each tensor as it is merged.

Every output tensor's name, shape and dtype are known before merging starts (from the inputs' headers),
so the shards are planned up front: tensors in order, a new shard when the next tensor would pass
``max_shard_bytes``. Each shard file is then a header (8-byte little-endian length, JSON, space-padded
to 8 bytes) followed by the tensors' bytes in order, so only the tensor being written is in memory.
One shard is ``model.safetensors``; more are ``model-0000i-of-0000n.safetensors`` with
``model.safetensors.index.json``, as transformers writes them.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmctl.core.errors import UsageError

DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(text: str) -> int:
    """``"2GB"`` -> 2_000_000_000 (KB/MB/GB are powers of 10, KiB/MiB/GiB of 2)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise UsageError(f"invalid size {text!r}: expected a number with B, KB, MB, GB (or KiB, MiB, GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


@dataclass
class Shard:
    tensors: list[tuple[str, tuple[int, ...], torch.dtype]] = field(default_factory=list)
    size: int = 0


def plan_shards(tensors: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int) -> list[Shard]:
    shards = [Shard()]
    for name, shape, dtype in tensors:
        size = nbytes(shape, dtype)
        if shards[-1].tensors and shards[-1].size + size > max_shard_bytes:
            shards.append(Shard())
        shards[-1].tensors.append((name, shape, dtype))
        shards[-1].size += size
    return shards


def _header(shard: Shard) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in shard.tensors:
        size = nbytes(shape, dtype)
        header[name] = {
            "dtype": DTYPE_CODES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
    """``with ShardedWriter(dir, plan, max_bytes) as w: w.write(name, tensor)`` in planned order."""

    def __init__(
        self, directory: Path, tensors: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int
    ) -> None:
        self.directory = Path(directory)
        self.shards = plan_shards(tensors, max_shard_bytes)
        n = len(self.shards)
        self.filenames = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._order = [(i, t) for i, shard in enumerate(self.shards) for t in shard.tensors]
        self._next = 0
        self._file = None
        self._shard = -1

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, (expected, shape, dtype) = self._order[self._next]
        if name != expected or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(
                f"writer expected {expected} {shape} {dtype}, got {name} {tuple(tensor.shape)}"
            )
        if shard != self._shard:
            if self._file is not None:
                self._file.close()
            self._file = open(self.directory / self.filenames[shard], "wb")  # noqa: SIM115 - closed in write/exit
            self._file.write(_header(self.shards[shard]))
            self._shard = shard
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def finish(self) -> None:
        if self._next != len(self._order):
            raise RuntimeError(f"writer got {self._next} of {len(self._order)} tensors")
        self.__exit__()
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.size for s in self.shards)},
                "weight_map": {t[0]: self.filenames[i] for i, t in self._order},
            }
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
