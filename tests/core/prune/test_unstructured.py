"""Unstructured pruning of whole models, layer by layer."""

import pytest
import torch

from llmctl.core.errors import UsageError
from llmctl.core.prune.masks import Pattern
from llmctl.core.prune.unstructured import prunable, prune_unstructured
from llmctl.core.prune.wanda import InputNorms, wanda_prune
from llmctl.core.quantize.calib import decoder_layers, linears_of
from tests.core.prune.conftest import calib_ids, load


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_decoder_linear_reaches_the_sparsity_and_the_rest_stays_dense(tiny4, method):
    model = load(tiny4)
    rows = prune_unstructured(model, method, sparsity=0.5, pattern=None, ids=calib_ids(), batch_size=4)
    targets = prunable(model)
    assert [r["name"] for r in rows] == list(targets)
    for r in rows:
        W = targets[r["name"]].weight
        assert r["sparsity"] == pytest.approx(0.5) == float((W == 0).float().mean())
        if method == "wanda":  # the comparison group is one output row
            assert ((W == 0).sum(1) == W.shape[1] // 2).all()
    assert float((model.lm_head.weight == 0).float().mean()) < 0.01
    assert float((model.model.embed_tokens.weight == 0).float().mean()) < 0.01


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_two_four_holds_in_every_group_of_four_of_every_linear(tiny4, method):
    model = load(tiny4)
    prune_unstructured(model, method, sparsity=None, pattern=Pattern(2, 4), ids=calib_ids(), batch_size=4)
    for lin in prunable(model).values():
        n, k = lin.weight.shape
        nonzero = (lin.weight != 0).reshape(n, k // 4, 4).sum(-1)
        assert (nonzero <= 2).all()


def test_wanda_calibrates_each_layer_on_the_outputs_of_the_already_pruned_layers(tiny4):
    ids = calib_ids()
    model = load(tiny4)
    prune_unstructured(model, "wanda", sparsity=0.5, pattern=None, ids=ids, batch_size=3)

    # by hand: prune layer 0 on the dense model's activations, then layer 1 on the pruned model's, ...
    ref = load(tiny4)
    for layer in decoder_layers(ref):
        lins = linears_of(layer)
        norms = {name: InputNorms(lin.in_features) for name, lin in lins.items()}
        handles = [
            lin.register_forward_hook(lambda m, a, o, stat=norms[name]: stat.add(a[0]))
            for name, lin in lins.items()
        ]
        with torch.no_grad():
            for start in range(0, len(ids), 3):
                ref(input_ids=ids[start : start + 3], use_cache=False)
        for h in handles:
            h.remove()
        for name, lin in lins.items():
            lin.weight.data = wanda_prune(lin.weight, norms[name], sparsity=0.5, pattern=None)
    for (name, a), b in zip(prunable(model).items(), prunable(ref).values(), strict=True):
        assert torch.equal(a.weight != 0, b.weight != 0), name


def test_sparsegpt_changes_the_kept_weights_and_keeps_the_model_output_closest_to_dense(tiny4):
    ids = calib_ids(samples=8, seq=32)
    dense = load(tiny4)
    with torch.no_grad():
        reference = dense.model(input_ids=ids).last_hidden_state
    losses = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = load(tiny4)
        prune_unstructured(model, method, sparsity=0.6, pattern=None, ids=ids, batch_size=4)
        with torch.no_grad():
            losses[method] = float(
                torch.linalg.norm(model.model(input_ids=ids).last_hidden_state - reference)
            )
        if method == "sparsegpt":
            a, b = model.model.layers[0].mlp.up_proj.weight, dense.model.layers[0].mlp.up_proj.weight
            kept = a != 0
            assert not torch.allclose(a[kept], b[kept])  # OBS updates moved the surviving weights
    assert losses["sparsegpt"] < losses["wanda"] < losses["magnitude"]


def test_a_pattern_whose_m_does_not_divide_an_input_dimension_fails_before_pruning(tiny4):
    model = load(tiny4)
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(UsageError, match="does not divide the input dimension 64"):
        prune_unstructured(model, "magnitude", sparsity=None, pattern=Pattern(2, 5))
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)
