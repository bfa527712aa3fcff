"""Speculative decoding in the serving engine: greedy output token-identical to serving without a draft
(a perfect draft and an imperfect one), sampled output seed-for-seed equal to ``generate --draft``, the
rejected drafts' blocks returned, and a draft with another vocabulary refused."""

import random
from dataclasses import replace

import pytest
import torch

from llmctl.core.errors import UsageError
from llmctl.core.generate.engine import Engine, Request, generate
from llmctl.core.generate.run import load_engine
from llmctl.core.generate.sampling import SamplingParams
from llmctl.core.generate.speculative import DraftVocab, generate_speculative
from llmctl.core.serve.engine import ServeConfig, ServeEngine
from tests.core.generate._models import sharp_llama


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sharp_path(tmp_path_factory):
    return sharp_llama(tmp_path_factory.mktemp("serve-spec") / "m", seed=3)


@pytest.fixture(scope="module")
def target(sharp_path):
    return load_engine(str(sharp_path))


@pytest.fixture(scope="module")
def noisy_draft(sharp_path):
    """The target with noise on its MLPs: it agrees with the target about a quarter to half the time."""
    draft = load_engine(str(sharp_path))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in draft.model.named_parameters():
            if "mlp" in name:
                p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.3)
    return draft


def _workload(n, seed=0, max_prompt=40, max_new=12):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 259) for _ in range(rng.randint(1, max_prompt))] for _ in range(n)]
    params = [SamplingParams(max_tokens=rng.randint(1, max_new), ignore_eos=True) for _ in prompts]
    return prompts, params


def _serve(engine, config, prompts, params, draft=None):
    core = ServeEngine(engine, config, draft=draft)
    seqs = [core.add_request(str(i), p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
    core.run_until_done()
    assert core.allocator.num_used == 0 and not core.requests
    core.allocator.check()
    return core, [[s.completion for s in group] for group in seqs]


@pytest.mark.parametrize("draft_kind", ["self", "noisy"])
def test_greedy_with_a_draft_is_token_identical_to_serving_without_one(target, noisy_draft, draft_kind):
    draft = target if draft_kind == "self" else noisy_draft
    prompts, params = _workload(24)
    # small blocks and a tight pool: chunked prefill, preemption and block trimming all happen
    config = ServeConfig(
        block_size=4, num_blocks=40, max_num_seqs=8, max_num_batched_tokens=32, num_draft_tokens=3
    )
    _, plain = _serve(target, config, prompts, params)
    core, spec = _serve(target, config, prompts, params, draft=draft)
    assert [c[0].token_ids for c in spec] == [c[0].token_ids for c in plain]
    assert [c[0].text for c in spec] == [c[0].text for c in plain]
    stats = core.spec_stats()
    assert stats["spec_decode_num_draft_tokens"] > 0
    if draft_kind == "self":  # the target as its own draft: every draft token is accepted
        assert stats["spec_decode_acceptance_rate"] == 1.0
        assert core.num_steps < _serve(target, config, prompts, params)[0].num_steps
    else:
        assert 0.05 < stats["spec_decode_acceptance_rate"] < 0.95


def test_greedy_with_a_draft_matches_generate_and_keeps_the_prefix_cache_right(target, noisy_draft):
    rng = random.Random(5)
    system = [rng.randrange(3, 259) for _ in range(24)]
    prompts = [system + [rng.randrange(3, 259) for _ in range(rng.randint(1, 6))] for _ in range(6)]
    params = [SamplingParams(max_tokens=10, ignore_eos=True) for _ in prompts]
    ref = [generate(target, [Request(p, sp)])[0].token_ids for p, sp in zip(prompts, params, strict=True)]
    core = ServeEngine(
        target, ServeConfig(block_size=8, num_blocks=64, num_draft_tokens=4), draft=noisy_draft
    )
    outs = []
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):  # one after another: later ones hit
        outs.append(core.add_request(str(i), p, sp)[0])
        core.run_until_done()
    assert [s.completion.token_ids for s in outs] == ref
    assert core.allocator.hits >= 5 * 24  # the shared blocks were reused (both caches hold them)
    assert core.allocator.num_used == 0


def test_sampled_output_is_generate_speculatives_seed_for_seed_and_reproducible(target, noisy_draft):
    prompt = list(b"Once upon a time")
    params = SamplingParams(max_tokens=12, temperature=0.9, top_k=50, seed=7, n=3, ignore_eos=True)
    ref = generate_speculative(target, noisy_draft, Request(prompt, params), num_draft=3)
    config = ServeConfig(block_size=4, num_blocks=64, num_draft_tokens=3)
    _, first = _serve(target, config, [prompt], [params], draft=noisy_draft)
    assert [c.token_ids for c in first[0]] == [r.token_ids for r in ref]
    # the same seeds alongside other requests (another batch composition) give the same samples
    others, other_params = _workload(5, seed=9)
    _, again = _serve(target, config, [*others, prompt], [*other_params, params], draft=noisy_draft)
    assert [c.token_ids for c in again[-1]] == [c.token_ids for c in first[0]]
    assert len({tuple(c.token_ids) for c in first[0]}) > 1


def test_draft_vocab_and_confidence_keep_greedy_output_and_generates_samples(target, noisy_draft):
    prompts, params = _workload(12, seed=3)
    config = ServeConfig(
        block_size=4, num_blocks=64, max_num_seqs=6, num_draft_tokens=3, draft_vocab=32, draft_confidence=0.3
    )
    _, plain = _serve(target, replace(config, draft_vocab=0, draft_confidence=0.0), prompts, params)
    core, spec = _serve(target, config, prompts, params, draft=noisy_draft)
    assert [c[0].token_ids for c in spec] == [c[0].token_ids for c in plain]
    assert core.spec_stats()["spec_decode_num_draft_tokens"] > 0
    # sampled: each sequence's draft head is its own (lowest ids + its tokens), as in generate --draft-vocab
    prompt = list(b"Once upon a time")
    sampled = SamplingParams(max_tokens=12, temperature=0.9, seed=7, n=2, ignore_eos=True)
    ref = generate_speculative(
        target, noisy_draft, Request(prompt, sampled), num_draft=3, draft_vocab=DraftVocab(noisy_draft, 32),
        min_confidence=0.3,
    )  # fmt: skip
    others, other_params = _workload(4, seed=9)
    _, got = _serve(target, config, [*others, prompt], [*other_params, sampled], draft=noisy_draft)
    assert [c.token_ids for c in got[-1]] == [r.token_ids for r in ref]
    with pytest.raises(UsageError, match="--draft-vocab and --draft-confidence go with --draft"):
        ServeEngine(target, config)
    with pytest.raises(UsageError, match="draft-confidence"):
        ServeEngine(target, replace(config, draft_confidence=1.5), draft=noisy_draft)


def test_logprobs_and_stop_strings_with_a_draft(target, noisy_draft):
    prompt = list(b"abcabcabc")
    params = SamplingParams(max_tokens=20, logprobs=True, top_logprobs=2, ignore_eos=True)
    config = ServeConfig(block_size=4, num_blocks=32, num_draft_tokens=4)
    _, plain = _serve(target, config, [prompt], [params])
    _, spec = _serve(target, config, [prompt], [params], draft=noisy_draft)
    a, b = plain[0][0], spec[0][0]
    assert b.token_ids == a.token_ids
    assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)
    assert [list(d) for d in b.top_logprobs] == [list(d) for d in a.top_logprobs]
    stop = a.text[5:7]
    cut = SamplingParams(max_tokens=20, stop=(stop,), ignore_eos=True)
    _, spec = _serve(target, config, [prompt], [cut], draft=noisy_draft)
    assert spec[0][0].text == a.text[: a.text.index(stop)] and spec[0][0].finish_reason == "stop"


def test_a_draft_with_another_vocabulary_is_a_usage_error(target, sharp_path):
    other = load_engine(str(sharp_path))
    tokenizer = type(other.tokenizer).from_pretrained(str(sharp_path))
    tokenizer.add_tokens(["<something-else>"])
    with pytest.raises(UsageError, match="vocabulary"):
        ServeEngine(target, ServeConfig(num_blocks=8), draft=Engine(other.model, tokenizer, [0]))


def test_blocks_of_rejected_drafts_are_returned_after_every_step(target, noisy_draft):
    prompts, params = _workload(8, seed=2, max_new=20)
    config = ServeConfig(block_size=2, num_blocks=200, num_draft_tokens=6)
    core = ServeEngine(target, config, draft=noisy_draft)
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        core.add_request(str(i), p, sp)
    rejected = 0
    while core.has_work():
        core.step()
        for seq in core.scheduler.running:
            # nothing kept past the sequence's tokens, everything computed kept
            assert -(-seq.num_computed // 2) <= len(seq.table) <= -(-seq.num_tokens // 2)
            assert seq.draft_computed in (seq.num_computed - 1, seq.num_computed)
        s = core.drafter.stats
        rejected = s.num_draft_tokens - s.num_accepted_tokens
        core.allocator.check()
    assert rejected > 0 and core.allocator.num_used == 0


def _repetitive(n, seed=0):
    """Prompts that repeat a phrase, so that prompt lookup finds n-grams to copy."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        phrase = [rng.randrange(3, 259) for _ in range(rng.randint(3, 6))]
        prompts.append(phrase * rng.randint(2, 5) + phrase[: rng.randint(0, 2)])
    return prompts


def test_prompt_lookup_greedy_is_token_identical_and_drafts_are_accepted(target):
    prompts = _repetitive(12)
    params = [SamplingParams(max_tokens=16, ignore_eos=True) for _ in prompts]
    config = ServeConfig(block_size=4, num_blocks=80, max_num_seqs=6, max_num_batched_tokens=24)
    _, plain = _serve(target, config, prompts, params)
    core, spec = _serve(target, replace(config, prompt_lookup=4), prompts, params)
    assert [c[0].token_ids for c in spec] == [c[0].token_ids for c in plain]
    stats = core.spec_stats()
    assert stats["spec_decode_num_draft_tokens"] > 0 and stats["spec_decode_num_accepted_tokens"] > 0


def test_prompt_lookup_samples_are_reproducible_per_seed(target):
    prompts = _repetitive(4, seed=1)
    params = SamplingParams(max_tokens=12, temperature=0.8, seed=3, n=2, ignore_eos=True)
    config = ServeConfig(block_size=4, num_blocks=80, prompt_lookup=3)
    _, alone = _serve(target, config, prompts[:1], [params])
    _, batched = _serve(target, config, prompts, [params] * 4)
    assert [c.token_ids for c in batched[0]] == [c.token_ids for c in alone[0]]
    with pytest.raises(UsageError, match="one of"):
        ServeEngine(target, config, draft=target)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (batched verification attention)")
def test_on_cuda_speculative_serving_matches_generate(sharp_path):
    engine = load_engine(str(sharp_path), device="cuda", dtype="float32")
    prompts, params = _workload(16, seed=3)
    ref = [generate(engine, [Request(p, sp)])[0].token_ids for p, sp in zip(prompts, params, strict=True)]
    for config, draft in (
        (ServeConfig(block_size=16, num_blocks=48, num_draft_tokens=3), engine),
        (ServeConfig(block_size=16, num_blocks=48, prompt_lookup=4), None),
    ):
        _, outs = _serve(engine, config, prompts, params, draft=draft)
        assert [c[0].token_ids for c in outs] == ref
