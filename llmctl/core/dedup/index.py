"""``--index DIR``: the bucket keys of every document seen so far, on disk, for incremental dedup.

Layout: ``meta.json`` (format version and the :class:`DedupParams` that made the keys: a later run with
other parameters is refused), ``keys.npy`` (``[docs, bands]`` uint64) and ``documents.txt`` (one
``file:line`` per document, the ids that ``dup_cluster`` and ``--clusters`` report). New documents that
share a bucket with an indexed one are duplicates of it; all new documents are added. The directory is
replaced atomically, so an interrupted run leaves the previous index intact.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llmctl.core.errors import UsageError
from llmctl.core.io import atomic_output

FORMAT = "llmctl-dedup-index/1"


class DedupIndex:
    def __init__(self, directory: Path, params: dict, keys: np.ndarray, wheres: list[str]) -> None:
        self.directory = directory
        self.params = params
        self.keys = keys
        self.wheres = wheres

    @classmethod
    def open(cls, directory: str | Path, params: dict, width: int) -> DedupIndex:
        """Load ``directory``, or start an empty index when it does not exist yet."""
        directory = Path(directory)
        if not directory.exists():
            return cls(directory, params, np.empty((0, width), dtype=np.uint64), [])
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise UsageError(f"--index {directory} exists but is not a dedup index (no meta.json)")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise UsageError(f"--index {directory}: unknown format {meta.get('format')!r}")
        if meta["params"] != params:
            diff = sorted(k for k in params if meta["params"].get(k) != params[k])
            raise UsageError(
                f"--index {directory} was built with other parameters ({', '.join(diff)}); "
                "use the same options or a new index"
            )
        keys = np.load(directory / "keys.npy")
        wheres = (directory / "documents.txt").read_text(encoding="utf-8").splitlines()
        if keys.shape != (len(wheres), width):
            raise UsageError(f"--index {directory} is corrupt: {keys.shape} keys for {len(wheres)} documents")
        return cls(directory, params, keys, wheres)

    def update(self, keys: np.ndarray, wheres: list[str]) -> None:
        self.keys, self.wheres = keys, list(wheres)

    def save(self) -> None:
        with atomic_output(self.directory, force=True, is_dir=True) as tmp:
            np.save(tmp / "keys.npy", self.keys)
            (tmp / "documents.txt").write_text("".join(w + "\n" for w in self.wheres), encoding="utf-8")
            meta = {"format": FORMAT, "params": self.params, "documents": len(self.wheres)}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
