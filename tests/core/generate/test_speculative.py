"""Speculative decoding: greedy is token-identical to plain greedy; sampling follows the target's law."""

import pytest
import torch

from llmctl.core.errors import UsageError
from llmctl.core.generate.engine import Request, generate
from llmctl.core.generate.run import encode_prompt, load_engine
from llmctl.core.generate.sampling import SamplingParams
from llmctl.core.generate.speculative import (
    DraftVocab,
    SpeculativeStats,
    accept_or_resample,
    check_draft,
    generate_speculative,
)
from tests.core.generate._models import sharp_llama

PROMPTS = ["Hello", "a b a b a b", "x"]


def _sharp(tmp_path_factory, seed):
    return load_engine(
        str(sharp_llama(tmp_path_factory.mktemp(f"spec{seed}") / "m", seed=seed)), device="cpu"
    )


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    return _sharp(tmp_path_factory, 3), _sharp(tmp_path_factory, 5)


@pytest.mark.parametrize("vocab", [0, 8])
@pytest.mark.parametrize("k", [1, 5])
def test_greedy_speculative_output_equals_plain_greedy_with_any_draft(engines, k, vocab):
    target, draft = engines
    for other in (draft, target):  # a different model (rejections) and the target itself (all accepted)
        stats = SpeculativeStats()
        draft_vocab = DraftVocab(other, vocab) if vocab else None
        for prompt in PROMPTS:
            ids = encode_prompt(target, "text", prompt)
            params = SamplingParams(max_tokens=17, ignore_eos=True)
            plain = generate(target, [Request(ids, params)])[0]
            spec = generate_speculative(
                target, other, Request(ids, params), num_draft=k, stats=stats, draft_vocab=draft_vocab
            )[0]
            assert spec.token_ids == plain.token_ids, (prompt, k)
            assert spec.finish_reason == plain.finish_reason
        if other is target and not vocab:
            assert stats.acceptance == 1.0
        assert stats.drafted > 0


def test_draft_vocab_scores_the_lowest_ids_the_specials_and_the_requests_tokens(engines):
    _, draft = engines
    vocab = DraftVocab(draft, 8)
    head = vocab.for_request([3, 200, 57, 200])
    h = torch.randn(2, 5, draft.model.args.hidden_size)
    with torch.inference_mode():
        full = draft.model.lm_head(h)
        got = head(h)
    kept = {*range(8), 57, 200, *draft.eos_token_ids, *draft.tokenizer.all_special_ids}
    mask = torch.zeros(full.shape[-1], dtype=torch.bool)
    mask[sorted(kept)] = True
    torch.testing.assert_close(got[..., mask], full[..., mask], rtol=1e-5, atol=1e-5)
    assert torch.isneginf(got[..., ~mask]).all()
    head.add([250, 57, 5])  # a new token joins; known ones change nothing
    with torch.inference_mode():
        grown = head(h)
    torch.testing.assert_close(grown[..., 250], full[..., 250], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grown[..., mask], got[..., mask])
    favoured = vocab.for_request([3], SamplingParams(logit_bias={240: 5.0, 241: -5.0}))
    assert 240 in favoured.extra and 241 not in favoured.extra  # what logit_bias favours is drafted
    with pytest.raises(UsageError, match="at least 1"):
        DraftVocab(draft, 0)


def test_draft_confidence_shortens_unsure_rounds_and_keeps_greedy_output(engines):
    target, draft = engines
    ids = encode_prompt(target, "text", "a b a b a b")
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    plain = generate(target, [Request(ids, params)])[0]
    always, unsure = SpeculativeStats(), SpeculativeStats()
    full = generate_speculative(target, draft, Request(ids, params), num_draft=5, stats=always)[0]
    short = generate_speculative(
        target, draft, Request(ids, params), num_draft=5, stats=unsure, min_confidence=0.9
    )[0]
    assert full.token_ids == short.token_ids == plain.token_ids
    assert unsure.drafted / unsure.steps < always.drafted / always.steps  # fewer drafts per round
    with pytest.raises(UsageError, match="draft-confidence"):
        generate_speculative(target, draft, Request(ids, params), min_confidence=1.0)


def test_speculative_respects_stop_tokens_and_max_tokens(engines):
    target, draft = engines
    ids = encode_prompt(target, "text", "Hello")
    plain = generate(target, [Request(ids, SamplingParams(max_tokens=12, ignore_eos=True))])[0]
    stop_id = plain.token_ids[5]
    params = SamplingParams(max_tokens=12, ignore_eos=True, stop_token_ids=(stop_id,))
    expected = generate(target, [Request(ids, params)])[0]
    got = generate_speculative(target, draft, Request(ids, params), num_draft=4)[0]
    assert got.token_ids == expected.token_ids and got.finish_reason == "stop"


def test_acceptance_rule_reproduces_the_target_distribution():
    """Draft from q, keep or resample with the rule: the result is distributed as p (Monte Carlo)."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.4, 0.1, 0.2, 0.2])
    draws = 20000
    counts = torch.zeros(5)
    accepted = 0
    for _ in range(draws):
        d = int(torch.multinomial(q, 1, generator=g))
        token, ok = accept_or_resample(p, q, d, g)
        counts[token] += 1
        accepted += ok
    empirical = counts / draws
    assert (empirical - p).abs().sum() / 2 < 0.015  # total variation
    # The expected acceptance rate is sum(min(p, q)) (Leviathan et al., eq. 1).
    assert accepted / draws == pytest.approx(float(torch.minimum(p, q).sum()), abs=0.015)


@pytest.mark.parametrize(("vocab", "confidence"), [(0, 0.0), (24, 0.0), (0, 0.5)])
def test_sampled_speculative_tokens_follow_the_targets_next_token_distribution(engines, vocab, confidence):
    """The 2nd token is drafted and accepted or resampled: its law given the 1st must be the target's,
    also when the draft's q is zero outside a part of the vocabulary (--draft-vocab) and when unsure
    rounds draft fewer tokens (--draft-confidence)."""
    from llmctl.core.generate.lookup import _forward
    from llmctl.core.generate.model import KVCache
    from llmctl.core.generate.speculative import distribution

    target, draft = engines
    ids = encode_prompt(target, "text", "a b a b a b")
    seconds: dict[int, list[int]] = {}
    stats = SpeculativeStats()
    draft_vocab = DraftVocab(draft, vocab) if vocab else None
    for seed in range(300):
        params = SamplingParams(max_tokens=3, temperature=0.7, ignore_eos=True, seed=seed)
        c = generate_speculative(
            target, draft, Request(ids, params), num_draft=2, stats=stats, draft_vocab=draft_vocab,
            min_confidence=confidence,
        )[0]  # fmt: skip
        seconds.setdefault(c.token_ids[0], []).append(c.token_ids[1])
    assert 0 < stats.acceptance < 1  # both branches of the rule ran
    first, followers = max(seconds.items(), key=lambda kv: len(kv[1]))
    cache = KVCache(target.model.args, 1, 32, "cpu", target.dtype)
    with torch.inference_mode():
        logits = _forward(target.model, cache, ids + [first], 0)[-1]
    law = distribution(logits, SamplingParams(temperature=0.7), ids + [first], {first: 1})
    empirical = torch.bincount(torch.tensor(followers), minlength=law.numel()).float() / len(followers)
    tv = float((empirical - law).abs().sum() / 2)
    # The noise floor of the total variation for this many draws from this law, by simulation.
    g = torch.Generator().manual_seed(1)
    n = len(followers)
    noise = sorted(
        float((torch.bincount(torch.multinomial(law, n, True, generator=g), minlength=law.numel()) / n - law)
              .abs().sum() / 2)
        for _ in range(200)
    )  # fmt: skip
    assert tv <= noise[-1] * 1.2, (tv, noise[-1], len(followers))


def test_a_draft_with_another_vocabulary_is_refused(engines):
    target, draft = engines

    class OtherTokenizer:
        def get_vocab(self):
            return {"a": 0}

    original = draft.tokenizer
    draft.tokenizer = OtherTokenizer()
    try:
        with pytest.raises(UsageError, match="vocabulary"):
            check_draft(target, draft)
    finally:
        draft.tokenizer = original
