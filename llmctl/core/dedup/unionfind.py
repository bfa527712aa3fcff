"""Union-find (disjoint sets) whose root is always the smallest member, so cluster ids are deterministic."""

from __future__ import annotations

import numpy as np


class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            lo, hi = (rx, ry) if rx < ry else (ry, rx)
            self.parent[hi] = lo

    def roots(self) -> np.ndarray:
        """``[n]`` int64: each element's root (its cluster's smallest member)."""
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)
