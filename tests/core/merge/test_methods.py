"""Each method against its formula on small hand-made tensors; DARE's keep rate and rescaling."""

from __future__ import annotations

import math

import pytest
import torch

from llmctl.core.errors import UsageError
from llmctl.core.merge.methods import REGISTRY, Inputs, get_method
from llmctl.core.merge.methods.slerp import slerp
from llmctl.core.merge.methods.sparsify import bernoulli, magnitude, magnitude_outliers
from llmctl.core.merge.run import tensor_seed


def _inputs(tensors, base=None, shared=None, per_input=None, generator=None):
    per_input = per_input or [{} for _ in tensors]
    return Inputs(list(tensors), base, shared or {}, per_input, generator)


def test_every_method_names_its_paper_or_reference():
    for method in REGISTRY.values():
        assert method.reference_url.startswith("https://"), method.name


def test_unknown_method_is_a_usage_error_listing_the_known_ones():
    with pytest.raises(UsageError, match="unknown merge method 'nope'.*ties"):
        get_method("nope")


def test_linear_is_the_weighted_mean():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    out = get_method("linear").merge(
        _inputs([a, b], shared={"normalize": True}, per_input=[{"weight": 3.0}, {"weight": 1.0}])
    )
    assert torch.allclose(out, torch.tensor([1.5, 3.0]))


def test_task_arithmetic_adds_weighted_task_vectors_scaled_by_lambda():
    base, a, b = torch.zeros(3), torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 4.0, -2.0])
    shared = {"normalize": False, "rescale": False, "lambda": 0.5}
    per = [{}, {"weight": 1.0, "density": 1.0}, {"weight": 0.5, "density": 1.0}]
    out = get_method("task_arithmetic").merge(_inputs([base, a, b], 0, shared, per))
    assert torch.allclose(out, 0.5 * (a + 0.5 * b))


def test_ties_trims_elects_the_sign_and_takes_the_disjoint_mean():
    base = torch.zeros(4)
    a = torch.tensor([3.0, -1.0, 0.5, 2.0])  # density 0.5 keeps 3.0 and 2.0
    b = torch.tensor([-1.0, -4.0, 0.1, 1.0])  # keeps -4.0 and -1.0
    c = torch.tensor([-5.0, 0.2, 0.0, 0.3])  # density 0.25 keeps -5.0
    shared = {"normalize": True, "rescale": False, "lambda": 1.0}
    per = [
        {},
        {"weight": 1.0, "density": 0.5},
        {"weight": 1.0, "density": 0.5},
        {"weight": 1.0, "density": 0.25},
    ]
    out = get_method("ties").merge(_inputs([base, a, b, c], 0, shared, per))
    # entry 0: 3 - 1 - 5 < 0 -> elected -, keep -1 and -5 -> mean -3; entry 1: only -4; entry 3: only 2
    assert torch.allclose(out, torch.tensor([-3.0, -4.0, 0.0, 2.0]))


def test_magnitude_keeps_the_largest_entries():
    delta = torch.tensor([0.1, -5.0, 2.0, -0.3, 4.0])
    assert torch.equal(magnitude(delta, 0.4), torch.tensor([0.0, -5.0, 0.0, 0.0, 4.0]))


def test_breadcrumbs_drops_outliers_then_the_smallest():
    delta = torch.arange(1.0, 11.0)  # 1..10
    out = magnitude_outliers(delta, density=0.5, gamma=0.2)  # drop 9, 10 (outliers) and 1, 2, 3
    assert torch.equal(out != 0, torch.tensor([False] * 3 + [True] * 5 + [False] * 2))


@pytest.mark.parametrize("density", [0.1, 0.3, 0.9])
def test_dare_keeps_each_entry_with_probability_density_and_rescales(density):
    delta = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    out = bernoulli(delta, density, rescale=True, generator=g)
    kept = out != 0
    n = delta.numel()
    assert abs(kept.float().mean().item() - density) < 4 * math.sqrt(density * (1 - density) / n)
    # survivors are scaled by one factor that restores the L1 norm, about 1 / density
    ratio = out[kept] / delta[kept]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))
    assert torch.isclose(out.abs().sum(), delta.abs().sum(), rtol=1e-4)
    assert abs(ratio[0].item() - 1 / density) < 0.02 / density


def test_dare_without_rescale_only_masks():
    delta = torch.randn(1000)
    out = bernoulli(delta, 0.5, rescale=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[out != 0], delta[out != 0])


def test_dare_is_reproducible_per_tensor_and_seed():
    assert tensor_seed(0, "a") == tensor_seed(0, "a")
    assert tensor_seed(0, "a") != tensor_seed(1, "a") != tensor_seed(0, "b")


def test_slerp_endpoints_are_the_inputs_and_the_middle_keeps_the_norm():
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([0.0, 1.0])
    assert torch.allclose(slerp(0.0, a, b), a)
    assert torch.allclose(slerp(1.0, a, b), b)
    mid = slerp(0.5, a, b)
    assert torch.allclose(mid, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))


def test_slerp_falls_back_to_lerp_for_nearly_colinear_tensors():
    a = torch.tensor([1.0, 2.0, 3.0])
    assert torch.allclose(slerp(0.25, a, 2 * a), 0.75 * a + 0.25 * 2 * a)


def test_model_stock_interpolates_by_the_angle_between_task_vectors():
    base = torch.zeros(2)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])  # orthogonal: cos 0 -> t = 0 -> base
    out = get_method("model_stock").merge(_inputs([base, a, b], 0, {"filter_wise": False}))
    assert torch.allclose(out, base)
    out = get_method("model_stock").merge(_inputs([base, a, a], 0, {"filter_wise": False}))  # cos 1 -> t = 1
    assert torch.allclose(out, a)


@pytest.mark.parametrize(
    ("name", "count", "base", "message"),
    [
        ("slerp", 3, True, "at most 2"),
        ("model_stock", 2, True, "at least 3"),
        ("ties", 2, False, "needs a base"),
    ],
)
def test_methods_refuse_the_wrong_number_of_models(name, count, base, message):
    with pytest.raises(UsageError, match=message):
        get_method(name).check_models(count, base)


@pytest.mark.parametrize("ties", [False, True])
def test_threshold_sparsifiers_keep_the_same_entries_as_a_full_sort(ties):
    """TIES's magnitude trim and Breadcrumbs' band keep use k-th value searches (memory); the kept set
    must equal the argsort definition, also with tied magnitudes at the cut (zeros, repeated values)."""
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(64, 33, generator=g)
    if ties:
        delta[:10] = 0.0
        delta[10:20] = 0.5
    n = delta.numel()
    order = torch.argsort(delta.abs().reshape(-1), descending=True)
    for density in (0.1, 0.3, 0.7):
        k = max(1, int(density * n))
        got = magnitude(delta, density) != 0
        want = torch.zeros(n, dtype=torch.bool)
        want[order[:k]] = True
        assert int(got.sum()) == k
        if not ties:
            assert torch.equal(got.reshape(-1), want)
        kept = magnitude_outliers(delta, density, gamma=0.05) != 0
        keep, n_top = int(density * n), int(0.05 * n)
        assert int(kept.sum()) <= keep  # zeros among the kept entries stay zero
        if not ties:
            ascending = torch.argsort(delta.abs().reshape(-1))
            n_bottom = max(0, n - keep - n_top)
            want = torch.zeros(n, dtype=torch.bool)
            want[ascending[n_bottom : n_bottom + keep]] = True
            assert torch.equal(kept.reshape(-1), want)
