"""The paged KV cache's bookkeeping: a block allocator with reference counts and automatic prefix caching.

The cache is ``num_blocks`` blocks of ``block_size`` token slots (vLLM's PagedAttention, Kwon et al. 2023,
https://arxiv.org/abs/2309.06180). A sequence owns a *block table*, the list of its block ids in order;
token ``i`` of the sequence lives in slot ``table[i // block_size] * block_size + i % block_size``.

Prefix caching (vLLM's automatic prefix caching): once a block is full and its keys/values computed, it
is registered under a hash chained through its parent block's hash and its own token ids, so equal
prefixes (a shared system prompt) map to equal hashes. A new sequence reuses every leading block whose
hash is cached instead of recomputing it; shared blocks are reference counted. A block whose count falls
to zero goes to the free list but keeps its hash, so a later request can still hit it, until the
allocator needs a block and takes the least recently freed one (LRU eviction).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from llmctl.core.errors import LlmctlError


class NoFreeBlocksError(LlmctlError):
    """Every block is referenced by a running sequence (the scheduler preempts one and retries)."""


def block_hash(parent: bytes | None, token_ids: tuple[int, ...] | list[int]) -> bytes:
    """The key of a full block: sha256 over the parent block's key and this block's token ids."""
    h = hashlib.sha256(parent or b"\0")
    h.update(b",".join(str(t).encode() for t in token_ids))
    return h.digest()


@dataclass
class Block:
    id: int
    ref_count: int = 0
    hash: bytes | None = None  # set once the block is full and computed (prefix caching on)


class BlockAllocator:
    """Free list + reference counts + (optionally) the prefix cache of full blocks.

    Invariants (checked by :meth:`check`): a block is on the free list exactly when its ref count is 0;
    every cached hash points at a block that carries that hash.
    """

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be at least 1")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU first
        self._cached: dict[bytes, int] = {}  # hash -> block id
        self.queries = 0  # prefix-cache lookups, in tokens (vLLM counts tokens)
        self.hits = 0

    # -- counts -------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    # -- allocation ---------------------------------------------------------------------------------
    def allocate(self) -> int:
        """A fresh block (ref count 1); evicts the least recently freed cached block if it must."""
        if not self._free:
            raise NoFreeBlocksError("the KV cache has no free block")
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            if self._cached.get(block.hash) == block_id:
                del self._cached[block.hash]
            block.hash = None
        block.ref_count = 1
        return block_id

    def free(self, table: list[int]) -> None:
        """Drop one reference to each block of a table. Tail blocks are freed first, so that they are
        evicted before the head of the prefix they extend (a prefix's head is shared more often)."""
        for block_id in reversed(table):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise AssertionError(f"block {block_id} freed twice")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None

    # -- prefix cache -------------------------------------------------------------------------------
    def cached_prefix_blocks(self, hashes: list[bytes]) -> int:
        """How many leading ``hashes`` are cached (no references taken, nothing counted)."""
        if not self.prefix_caching:
            return 0
        n = 0
        while n < len(hashes) and hashes[n] in self._cached:
            n += 1
        return n

    def lookup_prefix(self, hashes: list[bytes], num_tokens: int) -> list[int]:
        """Blocks holding the longest cached prefix among the leading full-block ``hashes`` of a
        ``num_tokens``-token prompt; each returned block gains a reference. Counts queries and hits in
        tokens, as vLLM's ``prefix_cache_queries``/``prefix_cache_hits`` do."""
        if not self.prefix_caching:
            return []
        table: list[int] = []
        self.queries += num_tokens
        for h in hashes:
            block_id = self._cached.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            table.append(block_id)
        self.hits += len(table) * self.block_size
        return table

    def register(self, table: list[int], hashes: list[bytes], start: int, stop: int) -> None:
        """Cache blocks ``table[start:stop]`` (full and computed) under ``hashes[start:stop]``."""
        if not self.prefix_caching:
            return
        for i in range(start, stop):
            block = self.blocks[table[i]]
            if block.hash is None and hashes[i] not in self._cached:
                block.hash = hashes[i]
                self._cached[hashes[i]] = block.id
            # else: already cached, or the same content was computed twice in one step: keep the first

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            block.hash = None
        self._cached.clear()

    def check(self) -> None:
        """Raise AssertionError if the invariants are broken (used by the tests)."""
        for block in self.blocks:
            assert block.ref_count >= 0, f"block {block.id} has a negative ref count"
            assert (block.ref_count == 0) == (block.id in self._free), f"block {block.id} free list mismatch"
        for h, block_id in self._cached.items():
            assert self.blocks[block_id].hash == h, f"cached hash of block {block_id} is stale"
