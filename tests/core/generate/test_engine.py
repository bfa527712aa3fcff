"""The engine against transformers (the reference): greedy tokens, processors, samplers."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmctl.core.generate import cpu_kernels
from llmctl.core.generate.engine import Request, generate
from llmctl.core.generate.run import load_engine
from llmctl.core.generate.sampling import SamplingParams, process_logits, sample, warp
from tests.core.generate._models import sharp_llama

PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog", "a b", "Once upon a time, there"]


@pytest.fixture(scope="module")
def sharp_model(tmp_path_factory):
    """A tiny random llama with larger weights, so its next-token distribution has clear winners."""
    return sharp_llama(tmp_path_factory.mktemp("gen") / "m", seed=3)


def _hf_greedy(model, tokenizer, prompts, max_new):
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=None)  # fmt: skip
    return [row[enc["input_ids"].shape[1] :].tolist() for row in out]


def _check_greedy(path, prompts, max_new, singles=True):
    engine = load_engine(str(path), device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    ours = generate(engine, [Request(i, SamplingParams(max_tokens=max_new, ignore_eos=True)) for i in ids])
    assert [c.token_ids for c in ours] == _hf_greedy(hf, tokenizer, prompts, max_new)
    if singles:
        alone = [
            generate(engine, [Request(i, SamplingParams(max_tokens=max_new, ignore_eos=True))])[0]
            for i in ids
        ]
        assert [c.token_ids for c in alone] == [c.token_ids for c in ours]


@pytest.mark.parametrize("cpu_kernels", ["on", "off"])
def test_greedy_tokens_equal_transformers_for_a_mixed_length_batch(sharp_model, cpu_kernels, monkeypatch):
    """With llmctl's CPU decode kernels (the default where they build) and with torch alone."""
    monkeypatch.setenv("LLMCTL_CPU_KERNELS", "1" if cpu_kernels == "on" else "0")
    _check_greedy(sharp_model, PROMPTS, 24)


@pytest.mark.slow
def test_greedy_tokens_equal_transformers_on_smollm2(smollm2):
    _check_greedy(smollm2, PROMPTS[1:], 16, singles=False)


def test_seeded_samples_do_not_depend_on_the_rest_of_the_batch(sharp_model):
    engine = load_engine(str(sharp_model), device="cpu")
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=42, ignore_eos=True)
    target = Request([1, 80, 90, 100], params)
    alone = generate(engine, [target])[0].token_ids
    other = Request([5, 6, 7, 8, 9, 10, 11], SamplingParams(max_tokens=16, temperature=0.8, seed=7))
    in_batch = generate(engine, [other, target, other])[1].token_ids
    assert alone == in_batch
    reseeded = Request(
        target.prompt_ids, SamplingParams(max_tokens=16, temperature=1.0, seed=43, ignore_eos=True)
    )
    assert generate(engine, [reseeded])[0].token_ids != alone


def test_stop_strings_cut_the_completion_and_max_tokens_ends_with_length(sharp_model):
    engine = load_engine(str(sharp_model), device="cpu")
    ids = [1, 80, 90]
    full = generate(engine, [Request(ids, SamplingParams(max_tokens=12, ignore_eos=True))])[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 12
    assert full.usage == {"prompt_tokens": 3, "completion_tokens": 12, "total_tokens": 15}
    stop = full.text[3:5]
    cut = generate(engine, [Request(ids, SamplingParams(max_tokens=12, stop=(stop,), ignore_eos=True))])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    token = full.token_ids[2]
    by_id = generate(engine, [Request(ids, SamplingParams(max_tokens=12, stop_token_ids=(token,)))])[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == full.token_ids[:2]


# -- processors and warpers against transformers' own classes ---------------------------------------------
@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(50, generator=g) * 3


def test_repetition_penalty_matches_transformers(logits):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    context = [3, 7, 7, 20, 41]
    ours = process_logits(logits.clone(), SamplingParams(repetition_penalty=1.3), context, {})
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([context]), logits.clone()[None])[0]
    assert torch.allclose(ours, ref)


def test_frequency_presence_and_bias_follow_openais_definition(logits):
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, logit_bias={4: 10.0, 9: -100.0})
    ours = process_logits(logits.clone(), params, [], {2: 3, 5: 1})
    expected = logits.clone()
    expected[2] -= 0.5 * 3 + 0.25
    expected[5] -= 0.5 * 1 + 0.25
    expected[4] += 10.0
    expected[9] -= 100.0
    assert torch.allclose(ours, expected)


@pytest.mark.parametrize(
    ("params", "hf_warpers"),
    [
        (dict(temperature=0.7, top_k=5), [("TemperatureLogitsWarper", 0.7), ("TopKLogitsWarper", 5)]),
        (dict(temperature=1.3, top_p=0.8), [("TemperatureLogitsWarper", 1.3), ("TopPLogitsWarper", 0.8)]),
        (dict(temperature=1.0, min_p=0.1), [("TemperatureLogitsWarper", 1.0), ("MinPLogitsWarper", 0.1)]),
        (dict(temperature=0.9, top_k=10, top_p=0.9, min_p=0.05),
         [("TemperatureLogitsWarper", 0.9), ("TopKLogitsWarper", 10), ("TopPLogitsWarper", 0.9),
          ("MinPLogitsWarper", 0.05)]),
    ],
)  # fmt: skip
def test_warpers_match_transformers(logits, params, hf_warpers):
    import transformers.generation.logits_process as lp

    ref = logits.clone()[None]
    for name, value in hf_warpers:
        ref = getattr(lp, name)(value)(torch.zeros((1, 1), dtype=torch.long), ref)
    ours = warp(logits.clone(), SamplingParams(**params))
    assert torch.equal(torch.isinf(ours), torch.isinf(ref[0]))
    assert torch.allclose(ours[~torch.isinf(ours)], ref[0][~torch.isinf(ref[0])])


SAMPLER_SETTINGS = [
    dict(temperature=0.7),
    dict(temperature=1.0, top_k=4),
    dict(temperature=1.0, top_p=0.6),
    dict(temperature=1.5, min_p=0.2),
]


@pytest.mark.parametrize("params", SAMPLER_SETTINGS)
def test_samples_follow_the_distribution_the_definitions_give(params):
    # chi-square goodness of fit over 20,000 draws; the 0.999 quantile for <= 9 degrees of freedom is < 28
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0, -4.0])
    p = SamplingParams(**params)
    expected = warp(logits.clone(), p).softmax(-1)
    g = torch.Generator().manual_seed(1)
    draws = 20_000
    counts = torch.bincount(torch.tensor([sample(logits.clone(), p, g) for _ in range(draws)]), minlength=10)
    support = expected > 0
    assert counts[~support].sum() == 0  # nothing outside what top-k/top-p/min-p keep
    exp_counts = expected[support] * draws
    chi2 = float(((counts[support] - exp_counts) ** 2 / exp_counts).sum())
    assert chi2 < 28, chi2
    assert math.isclose(float(expected.sum()), 1.0, rel_tol=1e-5)


# -- prompt lookup ---------------------------------------------------------------------------------------
def test_find_draft_copies_what_followed_the_latest_match():
    from llmctl.core.generate.lookup import find_draft

    tokens = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 4, 1, 2, 3]
    assert find_draft(tokens, 3, 3) == [7, 8, 4]  # the latest earlier "1 2 3" is followed by 7 8 4
    assert find_draft([5, 6, 7], 4, 3) == []
    assert find_draft([5, 6, 5], 4, 3) == [6, 5]  # falls back to shorter n-grams


@pytest.mark.parametrize("num_draft", [1, 4, 10])
def test_prompt_lookup_gives_exactly_the_greedy_tokens(sharp_model, num_draft):
    from llmctl.core.generate.lookup import LookupStats, generate_lookup

    engine = load_engine(str(sharp_model), device="cpu")
    # a repetitive prompt, so that drafts exist and some are accepted
    prompt = [1] + [40, 41, 42, 43, 44, 45] * 4
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    plain = generate(engine, [Request(prompt, params)])[0]
    stats = LookupStats()
    fast = generate_lookup(engine, Request(prompt, params), num_draft=num_draft, stats=stats)[0]
    assert fast.token_ids == plain.token_ids and fast.text == plain.text
    assert stats.drafted > 0 and stats.steps <= 30


@pytest.mark.slow
def test_prompt_lookup_matches_greedy_on_smollm2_and_saves_steps(smollm2):
    from llmctl.core.generate.lookup import LookupStats, generate_lookup

    engine = load_engine(str(smollm2), device="cpu")
    text = "Repeat exactly: " + "The quick brown fox jumps over the lazy dog. " * 2
    messages = [{"role": "user", "content": text}]
    ids = engine.tokenizer(
        engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )["input_ids"]
    params = SamplingParams(max_tokens=40)
    plain = generate(engine, [Request(ids, params)])[0]
    stats = LookupStats()
    fast = generate_lookup(engine, Request(ids, params), num_draft=8, stats=stats)[0]
    assert fast.token_ids == plain.token_ids
    assert stats.accepted > 0 and stats.steps < len(plain.token_ids)


@pytest.mark.parametrize("window,ngram", [(1, 2), (4, 3), (7, 4)])
def test_lookahead_gives_exactly_the_greedy_tokens(sharp_model, window, ngram):
    from llmctl.core.generate.lookup import LookupStats, generate_lookahead

    engine = load_engine(str(sharp_model), device="cpu")
    for prompt in ([1, 40, 41, 42], [1] + [40, 41, 42, 43] * 3):
        params = SamplingParams(max_tokens=30, ignore_eos=True)
        plain = generate(engine, [Request(prompt, params)])[0]
        stats = LookupStats()
        fast = generate_lookahead(engine, Request(prompt, params), window=window, ngram=ngram, stats=stats)[0]
        assert fast.token_ids == plain.token_ids and fast.text == plain.text
        assert stats.drafted > 0


def test_lookahead_pool_and_jacobi_guesses_come_from_the_verification_pass():
    from llmctl.core.generate.lookup import Lookahead

    drafter = Lookahead(window=3, ngram=3)
    assert drafter.propose([7], 5) == []  # nothing known yet
    drafter.observe(block=[7, 1, 2, 3], greedy=[1, 9, 4, 5], accepted=1)  # 1 accepted, then 9 emitted
    assert drafter.guesses == [4, 5]  # predictions past the emitted token: the next Jacobi guesses
    assert drafter.pool[7][0] == (7, 1, 9)
    assert drafter.propose([7], 5) == [1, 9]  # a pool n-gram starting at the last token wins
    assert drafter.propose([8], 5) == [4, 5]  # otherwise the Jacobi guesses
    assert drafter.propose([8], 1) == [4]


def test_engine_on_llmctl_kernels_gives_the_same_greedy_tokens(sharp_model, monkeypatch):
    """RMSNorm, RoPE and SwiGLU through the Triton kernels (the interpreter here, CUDA on a GPU)."""
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    prompts = [[1, 40, 41, 42], [1, 7]]
    plain = generate(load_engine(str(sharp_model), device="cpu"), [Request(p, params) for p in prompts])
    monkeypatch.setenv("LLMCTL_KERNELS", "triton")
    engine = load_engine(str(sharp_model), device="cpu")
    kernels = [
        m for m in engine.model.modules() if getattr(m, "kernel", None) or getattr(m, "rope_kernel", None)
    ]
    assert len(kernels) == 4 * engine.model.args.n_layers + 1  # 2 norms, attention, MLP per layer; final norm
    fast = generate(engine, [Request(p, params) for p in prompts])
    assert [c.token_ids for c in fast] == [c.token_ids for c in plain]


def test_a_stop_string_at_the_very_start_gives_an_empty_completion(sharp_model):
    engine = load_engine(str(sharp_model), device="cpu")
    ids = [1, 40, 41]
    free = generate(engine, [Request(ids, SamplingParams(max_tokens=8, ignore_eos=True))])[0]
    stop = free.text[:2]
    assert stop
    cut = generate(engine, [Request(ids, SamplingParams(max_tokens=8, ignore_eos=True, stop=(stop,)))])[0]
    assert cut.text == "" and cut.finish_reason == "stop"


def test_on_a_cpu_the_engine_fuses_qkv_and_gate_up_and_switches_weight_layout_keeping_every_weight(
    sharp_model, monkeypatch
):
    """Without llmctl's CPU kernels, the CPU layouts (fused projections; column-major weights for batch 1,
    row-major otherwise) are views of the same weights: the state dict is transformers', tensor for
    tensor, and greedy decoding still matches (the greedy tests run batch 1 and mixed batches)."""
    monkeypatch.setenv("LLMCTL_CPU_KERNELS", "0")
    engine = load_engine(str(sharp_model), device="cpu")
    model = engine.model
    assert all(
        layer.self_attn.qkv is not None and layer.mlp.gate_up is not None for layer in model.model.layers
    )
    attn = model.model.layers[0].self_attn
    assert not attn.decode_kernel and "forward" not in vars(attn.o_proj)
    hf = AutoModelForCausalLM.from_pretrained(sharp_model, dtype=torch.float32).state_dict()
    x = torch.randn(2, 3, model.args.hidden_size)
    for column_major in (True, False, True):
        model.column_major(column_major)
        assert attn.q_proj.weight.data_ptr() == attn.qkv.weight.data_ptr()  # a view, no copy
        for layer in model.model.layers:
            attn_l, mlp = layer.self_attn, layer.mlp
            for weight in (attn_l.qkv.weight, mlp.gate_up.weight, attn_l.o_proj.weight, mlp.down_proj.weight,
                           model.lm_head.weight):  # fmt: skip
                assert (weight.stride(0) == 1) == column_major
        _check_same_weights_and_projections(model, hf, x)
    generate(engine, [Request([1, 2, 3], SamplingParams(max_tokens=2))] * 2)
    assert model.lm_head.weight.is_contiguous()  # a batch of 2 decodes on row-major weights


def _check_same_weights_and_projections(model, hf_state, x):
    assert model.model.embed_tokens.weight is model.lm_head.weight  # still tied
    for name, tensor in model.state_dict().items():
        if name in hf_state:
            assert torch.equal(tensor, hf_state[name]), name
    attn = model.model.layers[0].self_attn
    with torch.inference_mode():
        q, k, v = attn.project_qkv(x)
        separate = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1)
    assert torch.allclose(torch.cat([q, k, v], -1), separate, atol=1e-6)


@pytest.mark.skipif(not cpu_kernels.available(), reason="no AVX2 CPU or C compiler here")
def test_with_cpu_kernels_every_linear_norm_and_decode_attention_goes_through_them_on_row_major_weights(
    sharp_model,
):
    engine = load_engine(str(sharp_model), device="cpu")
    model = engine.model
    hf = AutoModelForCausalLM.from_pretrained(sharp_model, dtype=torch.float32).state_dict()
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.decode_kernel and attn.qkv.linear is cpu_kernels.linear
        assert mlp.gate_up.linear is cpu_kernels.linear
        assert "forward" in vars(attn.o_proj) and "forward" in vars(mlp.down_proj)  # routed to the kernel
        assert layer.input_layernorm.cpu_kernel and layer.post_attention_layernorm.cpu_kernel
    assert "forward" in vars(model.lm_head) and model.model.norm.cpu_kernel
    model.column_major(True)  # the kernel reads row-major weights: the layout does not switch
    assert model.lm_head.weight.is_contiguous() and model.model.layers[0].self_attn.qkv.weight.is_contiguous()
    _check_same_weights_and_projections(model, hf, torch.randn(1, 1, model.args.hidden_size))
