"""MinHash signatures and LSH parameters against datasketch and the readable references."""

from __future__ import annotations

import numpy as np
import pytest
from datasketch import MinHash
from datasketch.lsh import _optimal_param

from llmctl.core.dedup.hashing import UnitHasher, fast_hashes, fast_hashes_batch, fast_hashes_reference
from llmctl.core.dedup.lsh import band_keys, candidate_edges, optimal_params
from llmctl.core.dedup.minhash import permutations, signature_reference, signatures, signatures_from_hashes
from llmctl.core.dedup.text import normalize, parse_normalize, shingles
from llmctl.core.dedup.unionfind import UnionFind
from llmctl.core.errors import UsageError

TEXTS = ["the cat sat on the mat", "a", "héllo wörld 👋 漢字 and more words here " * 5, "x y"]


@pytest.mark.parametrize("num_perm,seed", [(128, 1), (64, 7)])
def test_signatures_equal_datasketch_minhash_and_the_reference(num_perm, seed):
    a, b = permutations(num_perm, seed)
    docs = [shingles(t, 3) for t in TEXTS]
    fast = signatures(docs, a, b)
    for doc, sig in zip(docs, fast, strict=True):
        m = MinHash(num_perm=num_perm, seed=seed)
        m.update_batch([s.encode() for s in doc])
        assert np.array_equal(m.hashvalues, sig)
        assert np.array_equal(signature_reference(doc, a, b), sig)


def test_batched_signatures_do_not_depend_on_chunking(monkeypatch):
    import llmctl.core.dedup.minhash as mh

    a, b = permutations(128)
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 300, size=100)
    hashes = rng.integers(0, 2**32, size=int(counts.sum()), dtype=np.uint64).astype(np.uint32)
    whole = signatures_from_hashes(hashes, counts, a, b)
    monkeypatch.setattr(mh, "_CHUNK", 7)
    assert np.array_equal(whole, signatures_from_hashes(hashes, counts, a, b))


@pytest.mark.parametrize("kind,n", [("word", 5), ("word", 1), ("char", 3)])
def test_fast_shingle_hashes_equal_the_one_at_a_time_reference(kind, n):
    hasher = UnitHasher()
    for text in TEXTS:
        assert fast_hashes(text, n, kind, hasher).tolist() == fast_hashes_reference(text, n, kind)


@pytest.mark.parametrize("kind,n", [("word", 5), ("word", 2), ("char", 4)])
def test_batched_fast_hashes_equal_the_per_document_ones(kind, n):
    texts = [*TEXTS, "", "one", "w1 w2 w3 w4 w5 w6", "z"]
    hashes, counts = fast_hashes_batch(texts, n, kind, UnitHasher())
    assert counts.tolist() == [len(fast_hashes(t, n, kind, UnitHasher())) for t in texts]
    assert hashes.tolist() == [h for t in texts for h in fast_hashes(t, n, kind, UnitHasher()).tolist()]


def test_shingles_of_a_short_text_are_the_whole_text():
    assert shingles("a b", 5) == ["a b"]
    assert shingles("abcdef", 3, "char") == ["abc", "bcd", "cde", "def"]
    assert len(fast_hashes("a b", 5, "word", UnitHasher())) == 1


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9])
def test_lsh_parameters_follow_datasketchs_optimal_rule(threshold):
    assert optimal_params(threshold, 128) == _optimal_param(threshold, 128, 0.5, 0.5)
    assert optimal_params(threshold, 128, 0.1, 0.9) == _optimal_param(threshold, 128, 0.1, 0.9)


def test_equal_bands_give_equal_keys_and_candidate_edges_connect_buckets():
    sig = np.array([[1, 2, 3, 4], [1, 2, 9, 9], [7, 7, 3, 4], [5, 5, 5, 5]], dtype=np.uint32)
    keys = band_keys(sig, bands=2, rows=2)
    assert keys[0, 0] == keys[1, 0] and keys[0, 1] == keys[2, 1] and keys[0, 0] != keys[3, 0]
    assert candidate_edges(keys).tolist() == [[0, 1], [0, 2]]


def test_union_find_roots_are_the_smallest_member():
    uf = UnionFind(6)
    uf.union(4, 5)
    uf.union(5, 2)
    uf.union(3, 1)
    assert uf.roots().tolist() == [0, 1, 2, 1, 2, 2]


def test_normalisation_steps_apply_in_order_and_unknown_ones_fail():
    assert normalize("Ｈｅｌｌｏ,  World!", parse_normalize("nfkc,lower,punct,whitespace")) == "hello world"
    with pytest.raises(UsageError, match="unknown --normalize"):
        parse_normalize("lower,stem")
