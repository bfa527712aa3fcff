"""Large tensors are merged in chunks (streamed selection); the result must be the reference's."""

from __future__ import annotations

import pytest
import torch

from llmctl.core.merge.methods import Inputs, get_method
from llmctl.core.merge.methods import task_arithmetic as ta
from llmctl.core.merge.methods.sparsify import streamed


@pytest.fixture
def small_chunks(monkeypatch):
    """Stream tensors of 10k+ entries in 1,000-entry chunks, so tests stay small and cover many chunks."""
    monkeypatch.setattr(ta, "STREAM_MIN", 10_000)
    monkeypatch.setattr(ta, "CHUNK", 1_000)


def _models(n=3, shape=(97, 131), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return [base] + [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n - 1)]


SHARED = {"normalize": True, "rescale": False, "lambda": 1.0}
CASES = {
    "task_arithmetic": ({"normalize": False, "lambda": 0.7}, {"weight": 0.6, "density": 1.0}),
    "ties": ({}, {"weight": 0.5, "density": 0.3}),
    "ties_rescaled": ({"rescale": True}, {"weight": 0.5, "density": 0.3}),
    "dare_ties": ({"normalize": False, "rescale": True}, {"weight": 0.5, "density": 0.4}),
    "dare_linear": ({"normalize": False, "rescale": True}, {"weight": 0.7, "density": 0.2}),
    "breadcrumbs": ({"normalize": False}, {"weight": 0.5, "density": 0.8, "gamma": 0.05}),
    "breadcrumbs_ties": ({"normalize": False}, {"weight": 0.5, "density": 0.6, "gamma": 0.01}),
}


def _run(name, tensors, shared, per, seed=7):
    method = get_method(name.removesuffix("_rescaled"))
    g = torch.Generator().manual_seed(seed)
    return method.merge(Inputs(list(tensors), 0, {**SHARED, **shared}, per, g))


@pytest.mark.parametrize("name", sorted(CASES))
def test_streamed_merge_equals_the_whole_tensor_reference(name, monkeypatch):
    shared, per_model = CASES[name]
    tensors = _models()
    per = [{}] + [dict(per_model) for _ in tensors[1:]]
    reference = _run(name, tensors, shared, per)  # 12.7k entries: below the default threshold
    monkeypatch.setattr(ta, "STREAM_MIN", 10_000)
    monkeypatch.setattr(ta, "CHUNK", 1_000)
    calls = []
    original = ta.TaskArithmetic._merge_streamed
    monkeypatch.setattr(ta.TaskArithmetic, "_merge_streamed", lambda s, i: calls.append(1) or original(s, i))
    out = _run(name, tensors, shared, per)
    assert calls, "the streamed path was not taken"
    assert torch.allclose(out, reference, rtol=1e-6, atol=1e-6)
    if "rescale" not in shared or not shared["rescale"]:
        assert torch.equal(out != tensors[0], reference != tensors[0])  # the same kept set


def test_streamed_keeps_the_references_tied_entries_when_magnitudes_tie_at_the_cut(small_chunks):
    base = torch.zeros(20_000)
    a = torch.ones(20_000)  # every |delta| equal: the cut splits a tie, sort order decides
    b = torch.linspace(-1, 1, 20_000).round(decimals=2)  # many ties at any cut
    per = [{}, {"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}]
    out = get_method("ties").merge(Inputs([base, a, b], 0, dict(SHARED), per))
    whole = ta.TaskArithmetic._merge_whole(get_method("ties"), Inputs([base, a, b], 0, dict(SHARED), per))
    assert torch.equal(out, whole)
    for density in (0.3, 0.8):
        per = [
            {},
            {"weight": 1.0, "density": density, "gamma": 0.1},
            {"weight": 1.0, "density": 0.5, "gamma": 0.1},
        ]
        for name in ("breadcrumbs", "ties"):
            method = get_method(name)
            shared = dict(SHARED, normalize=False)
            whole = ta.TaskArithmetic._merge_whole(method, Inputs([base, a, b], 0, shared, per))
            assert torch.equal(method.merge(Inputs([base, a, b], 0, shared, per)), whole), (name, density)


def test_streamed_dare_advances_the_generator_like_the_reference():
    delta = torch.randn(5_000, generator=torch.Generator().manual_seed(1))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    from llmctl.core.merge.methods.sparsify import bernoulli

    reference = bernoulli(delta, 0.3, rescale=False, generator=g1)
    apply = streamed("random", lambda: iter(delta.split(999)), 5_000, 0.3, generator=g2)
    assert torch.equal(torch.cat([apply(d) for d in delta.split(999)]), reference)
    assert torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.parametrize("filter_wise", [False, True])
def test_streamed_model_stock_equals_the_whole_tensor_reference(monkeypatch, filter_wise):
    from llmctl.core.merge.methods import model_stock as ms

    tensors = _models(n=4)
    shared = {"filter_wise": filter_wise}
    reference = get_method("model_stock").merge(Inputs(list(tensors), 0, shared, [{}] * 4))
    monkeypatch.setattr(ms, "STREAM_MIN", 10_000)
    monkeypatch.setattr(ms, "CHUNK", 1_000)
    calls = []
    original = ms.ModelStock._merge_streamed
    monkeypatch.setattr(ms.ModelStock, "_merge_streamed", lambda _, *a: calls.append(1) or original(*a))
    out = get_method("model_stock").merge(Inputs(list(tensors), 0, shared, [{}] * 4))
    assert calls
    assert torch.allclose(out, reference, rtol=1e-6, atol=1e-6)
