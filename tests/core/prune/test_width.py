"""Width pruning: MLP channels and GQA head groups removed physically, configs that transformers loads."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmctl.core.errors import UsageError
from llmctl.core.prune import width
from llmctl.core.prune.wanda import InputNorms
from tests.core.prune.conftest import calib_ids, load


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_channel_score_is_the_input_norm_times_the_down_proj_column_norm(tiny4):
    model = load(tiny4)
    ids = calib_ids()
    down = model.model.layers[1].mlp.down_proj
    norms = InputNorms(down.in_features)
    handle = down.register_forward_hook(lambda m, a, o: norms.add(a[0]))
    _logits(model, ids)
    handle.remove()
    scores = width.channel_scores(model, ids, batch_size=4)
    assert torch.allclose(scores[1], norms.norms * down.weight.norm(dim=0), rtol=1e-5)


def test_channels_whose_output_weights_are_zero_go_first_and_removing_them_changes_nothing(tiny4, tmp_path):
    model = load(tiny4)
    ids = calib_ids()
    dead = {}
    for i, layer in enumerate(model.model.layers):  # silence a different half of the channels in each layer
        idx = torch.randperm(128, generator=torch.Generator().manual_seed(i))[:64]
        layer.mlp.down_proj.weight.data[:, idx] = 0
        dead[i] = set(idx.tolist())
    before = _logits(model, ids)
    report = width.prune_width(model, ids, "channels", 0.5, batch_size=4)
    assert model.config.intermediate_size == 64 and report["sizes"] == {"intermediate_size": [128, 64]}
    for i, row in enumerate(report["layers"]):
        assert not dead[i] & set(row["kept"])
        assert row["kept_score_share"] == pytest.approx(1.0)  # the silenced channels score zero
        assert model.model.layers[i].mlp.up_proj.weight.shape == (64, 64)
    assert torch.allclose(_logits(model, ids), before, atol=1e-5)
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert again.config.intermediate_size == 64
    assert torch.allclose(_logits(again, ids), before, atol=1e-5)


def test_head_groups_with_zero_output_weights_go_first_and_gqa_stays_intact(tiny4, tmp_path):
    model = load(tiny4)  # 4 query heads, 2 key/value heads, head_dim 16: group g = query heads 2g, 2g+1
    ids = calib_ids()
    for i, layer in enumerate(model.model.layers):
        g = i % 2
        layer.self_attn.o_proj.weight.data[:, g * 32 : (g + 1) * 32] = 0
    before = _logits(model, ids)
    report = width.prune_width(model, ids, "heads", 0.5, batch_size=4)
    assert [row["kept"] for row in report["layers"]] == [[1], [0], [1], [0]]
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 1, 16)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (32, 64) and attn.k_proj.weight.shape == (16, 64)
    assert attn.o_proj.weight.shape == (64, 32)
    assert torch.allclose(_logits(model, ids), before, atol=1e-5)
    model.save_pretrained(tmp_path / "h")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "h").eval()
    assert torch.allclose(_logits(again, ids), before, atol=1e-5)
    assert again.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_qwen2_biases_are_sliced_with_their_heads(qwen3, tmp_path):
    model = load(qwen3)
    ids = calib_ids(samples=2, seq=8)
    width.prune_width(model, ids, "heads", 0.5, batch_size=2)
    assert model.model.layers[0].self_attn.q_proj.bias.shape == (32,)
    model.save_pretrained(tmp_path / "q")
    _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "q"), ids)


@pytest.mark.parametrize("what", ["channels", "heads"])
def test_keep_ratio_one_is_the_identity(tiny4, what):
    model = load(tiny4)
    ids = calib_ids()
    before = _logits(model, ids)
    width.prune_width(model, ids, what, 1.0, batch_size=4)
    assert torch.equal(_logits(model, ids), before)


def test_kept_count_is_at_least_one_and_checks_the_ratio():
    assert width.kept_count(2, 0.1, "heads") == 1
    assert width.kept_count(1536, 0.5, "channels") == 768
    with pytest.raises(UsageError):
        width.kept_count(4, 0.0, "heads")


def test_a_layer_without_llama_style_linears_is_an_unsupported_architecture(tiny4):
    model = load(tiny4)
    model.model.layers[1].mlp = torch.nn.Identity()
    with pytest.raises(UsageError, match="unsupported architecture for --method channels: layer 1"):
        width.check_architecture(model, "channels")
