"""Layer scores, layer removal into loadable shallower models, progressive dropping."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmctl.core.errors import UsageError
from llmctl.core.prune import depth
from tests.core.prune.conftest import calib_ids, load


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_block_influence_is_one_minus_the_mean_cosine_of_each_layers_input_and_output(tiny4):
    model = load(tiny4)
    ids = calib_ids()
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states  # embeddings, then each layer
    bi = depth.block_influence(model, ids, batch_size=4)
    assert len(bi) == 4
    for i in range(3):  # the last entry of hidden_states has the final norm applied
        expected = 1 - float(F.cosine_similarity(hs[i], hs[i + 1], dim=-1).mean())
        assert bi[i] == pytest.approx(expected, abs=1e-5)


def test_angular_distance_compares_the_last_token_k_layers_apart(tiny4):
    model = load(tiny4)
    ids = calib_ids()
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    dists = depth.angular_distances(model, ids, block=2, batch_size=4)
    assert len(dists) == 3  # blocks starting at 0, 1, 2
    for start in range(2):
        cos = F.cosine_similarity(hs[start][:, -1], hs[start + 2][:, -1], dim=-1)
        assert dists[start] == pytest.approx(float((torch.arccos(cos) / math.pi).mean()), abs=1e-5)
    plan = depth.plan_one_shot(model, ids, "angular", 2, batch_size=4)
    best = min(range(3), key=lambda s: dists[s])
    assert plan.drop == [best, best + 1]


@pytest.mark.parametrize("score", ["block-influence", "ppl"])
def test_one_shot_drops_the_k_lowest_scoring_layers(tiny4, score):
    model = load(tiny4)
    plan = depth.plan_one_shot(model, calib_ids(), score, 2, batch_size=4)
    assert len(plan.drop) == 2
    ranked = sorted(range(4), key=lambda i: plan.scores[i])
    assert plan.drop == sorted(ranked[:2])


def test_ppl_score_is_the_loss_increase_when_the_layer_alone_is_removed(tiny4):
    model = load(tiny4)
    ids = calib_ids()
    base = depth.mean_loss(model, ids)
    plan = depth.plan_one_shot(model, ids, "ppl", 1)
    shallow = load(tiny4)
    depth.remove_layers(shallow, [2])
    assert plan.scores[2] == pytest.approx(depth.mean_loss(shallow, ids) - base, abs=1e-5)


def test_without_layers_matches_removal_and_restores_the_model(tiny4):
    model = load(tiny4)
    ids = calib_ids()
    dense = _logits(model, ids)
    with depth.without_layers(model, [1, 2]):
        skipped = _logits(model, ids)
        assert model.config.num_hidden_layers == 2
    assert torch.equal(_logits(model, ids), dense)
    assert model.config.num_hidden_layers == 4
    depth.remove_layers(model, [1, 2])
    assert torch.allclose(_logits(model, ids), skipped, atol=1e-6)


def test_a_layer_dropped_model_saves_loads_with_transformers_and_generates(tiny4, tmp_path):
    from transformers import AutoModelForCausalLM

    model = load(tiny4)
    ids = calib_ids(samples=2, seq=10)
    keep = depth.remove_layers(model, [0, 2])
    assert keep == [1, 3]
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path / "out")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert again.config.num_hidden_layers == 2
    assert len(again.model.layers) == 2
    assert torch.allclose(_logits(again, ids), expected, atol=1e-6)
    out = again.generate(ids[:1], max_new_tokens=5, do_sample=False)  # KV cache uses the renumbered layers
    assert out.shape == (1, 15)


def test_layer_types_are_kept_for_the_remaining_layers(qwen3, tmp_path):
    from transformers import AutoModelForCausalLM

    model = load(qwen3)
    model.config.use_sliding_window, model.config.sliding_window = True, 4
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    depth.remove_layers(model, [0])
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert again.config.layer_types == ["sliding_attention", "full_attention"]
    _logits(again, calib_ids(samples=1, seq=8))


def test_dropping_nothing_is_the_identity(tiny4):
    model = load(tiny4)
    ids = calib_ids()
    dense = _logits(model, ids)
    assert depth.remove_layers(model, []) == [0, 1, 2, 3]
    assert torch.equal(_logits(model, ids), dense)


@pytest.mark.parametrize(
    "drop, keep_ratio, expected",
    [(1, None, 1), (None, 0.5, 2), (None, 0.75, 1), (None, 1.0, 0), (0, None, 0)],
)
def test_drop_count_from_drop_or_keep_ratio(drop, keep_ratio, expected):
    assert depth.drop_count(4, drop, keep_ratio) == expected


@pytest.mark.parametrize(
    "drop, keep_ratio, message",
    [(4, None, "every layer"), (None, 0.0, "keep-ratio"), (-1, None, "0 or more"), (1, 0.5, "exactly one")],
)
def test_bad_drop_counts_are_usage_errors(drop, keep_ratio, message):
    with pytest.raises(UsageError, match=message):
        depth.drop_count(4, drop, keep_ratio)


def test_progressive_removes_greedily_by_domain_loss(tiny4):
    model = load(tiny4)
    ids = calib_ids()
    plan = depth.progressive_drop(model, ids, max_drop=2)
    first = plan.details["history"][0]["removed"]
    singles = depth.removal_losses(model, ids, range(4))
    assert first == min(range(4), key=lambda i: singles[i])
    second = plan.details["history"][1]["removed"]
    pairs = depth.removal_losses(model, ids, [i for i in range(4) if i != first], removed=[first])
    assert second == min(pairs, key=pairs.get)
    assert plan.drop == sorted([first, second])
    assert plan.details["history"][1]["loss"] == pytest.approx(pairs[second])


def test_progressive_stops_before_a_removal_that_raises_the_loss_too_much(tiny4):
    model = load(tiny4)
    ids = calib_ids()
    plan = depth.progressive_drop(model, ids, max_drop=3, max_loss_increase=-1e9)
    assert plan.drop == [] and plan.details["history"] == []
