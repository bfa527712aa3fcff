"""Lazy tensors: a model directory's safetensors, read one tensor at a time.

The index (``model.safetensors.index.json``) maps each tensor to its shard. Only the shards' headers
are parsed up front (8-byte little-endian length, then JSON: dtype, shape and byte offsets per tensor),
which is all planning needs. A tensor is then read with one positioned read of exactly its bytes. Plain
reads rather than a memory map: pages of a mapped file stay resident (and count in RSS) until the map
goes away, so a mapped merge grows towards the size of all its inputs; read and dropped tensors do not.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from llmctl.core.errors import ModelError

MAX_HEADER = 100 * 1024 * 1024

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # safetensors code: F32, BF16, F16, ...
    start: int = 0  # absolute byte offset of the data in its shard file
    end: int = 0


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (tensor name -> dtype, shape, data_offsets) and where its data starts."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file too short")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER:
                raise ValueError(f"header of {n} bytes")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {path}: not a safetensors file ({e})") from e
    header.pop("__metadata__", None)
    return header, 8 + n


class LazyModel:
    """``model.info(name)`` (shape and dtype, from the header) and ``model.get(name)`` (the tensor)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise ModelError(f"model not found: {path} (expected a Hugging Face model directory)")
        if not (self.path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json: not a Hugging Face model directory")
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise ModelError(f"{index}: not a valid safetensors index: {e}") from e
        elif (self.path / SINGLE_FILE).is_file():
            weight_map = None
        else:
            raise ModelError(f"{path} has no {SINGLE_FILE} or {INDEX_FILE} (only safetensors models merge)")
        self._files: dict[str, int] = {}
        self.shard_of: dict[str, str] = {}
        self.infos: dict[str, TensorInfo] = {}
        shards = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        for shard in shards:
            header, data_start = read_header(self.path / shard)
            for name, entry in header.items():
                if weight_map is not None and weight_map.get(name) != shard:
                    continue
                begin, end = entry["data_offsets"]
                self.infos[name] = TensorInfo(
                    tuple(entry["shape"]), entry["dtype"], data_start + begin, data_start + end
                )
                self.shard_of[name] = shard
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.infos))
            if missing:
                raise ModelError(f"{index} lists {missing[0]} but its shard does not hold it")

    def _fd(self, shard: str) -> int:
        fd = self._files.get(shard)
        if fd is None:
            fd = self._files[shard] = os.open(self.path / shard, os.O_RDONLY)
        return fd

    def names(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def info(self, name: str) -> TensorInfo:
        return self.infos[name]

    def get(self, name: str):
        """The tensor ``name``, read from disk into its own CPU buffer."""
        import torch

        from llmctl.core.merge.writer import CODE_DTYPES

        info = self.infos[name]
        size = info.end - info.start
        buf = bytearray(size)
        view = memoryview(buf)
        fd, done = self._fd(self.shard_of[name]), 0
        while done < size:
            n = os.preadv(fd, [view[done:]], info.start + done)
            if n <= 0:
                raise ModelError(f"{self.path / self.shard_of[name]} is truncated: cannot read {name}")
            done += n
        dtype = CODE_DTYPES.get(info.dtype)
        if dtype is None:
            raise ModelError(f"{self.path}: tensor {name} has unsupported dtype {info.dtype}")
        if size == 0:
            return torch.empty(info.shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)

    def config(self) -> dict:
        try:
            return json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot read {self.path / 'config.json'}: {e}") from e

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
