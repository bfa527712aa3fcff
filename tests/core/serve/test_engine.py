"""The serving engine against ``llmctl generate`` (the reference): same tokens whatever the batching,
chunking, preemption or prefix caching; every block returned at the end."""

import random

import pytest
import torch

from llmctl.core.generate.engine import Request, generate
from llmctl.core.generate.run import load_engine
from llmctl.core.generate.sampling import SamplingParams
from llmctl.core.serve.engine import RequestError, ServeConfig, ServeEngine


@pytest.fixture(scope="module")
def engine(tiny_model):
    return load_engine(str(tiny_model))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one intra-op thread is faster, and much faster on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _workload(n, seed=0, max_prompt=40, max_new=12):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 259) for _ in range(rng.randint(1, max_prompt))] for _ in range(n)]
    params = [SamplingParams(max_tokens=rng.randint(1, max_new), ignore_eos=True) for _ in prompts]
    return prompts, params


def _reference(engine, prompts, params):
    return [generate(engine, [Request(p, sp)])[0] for p, sp in zip(prompts, params, strict=True)]


def _serve(engine, config, prompts, params):
    core = ServeEngine(engine, config)
    seqs = [core.add_request(str(i), p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
    core.run_until_done()
    return core, seqs


def _assert_all_freed(core):
    assert core.allocator.num_used == 0
    assert not core.requests and not core.scheduler.running and not core.scheduler.waiting
    core.allocator.check()


def test_32_mixed_greedy_requests_match_generate_with_chunking_and_preemption(engine):
    prompts, params = _workload(32)
    ref = _reference(engine, prompts, params)
    # 12 blocks of 4 tokens cannot hold 8 sequences of up to 51 tokens: preemption must happen;
    # a budget of 16 tokens per step cuts prompts of up to 40 tokens into chunks.
    config = ServeConfig(block_size=4, num_blocks=20, max_num_seqs=8, max_num_batched_tokens=16)
    core, seqs = _serve(engine, config, prompts, params)
    assert [s[0].completion.token_ids for s in seqs] == [r.token_ids for r in ref]
    assert [s[0].completion.text for s in seqs] == [r.text for r in ref]
    assert core.scheduler.num_preemptions > 0
    _assert_all_freed(core)


def test_block_size_16_default_config_matches_generate(engine):
    prompts, params = _workload(12, seed=1, max_prompt=70)
    ref = _reference(engine, prompts, params)
    core, seqs = _serve(engine, ServeConfig(num_blocks=64), prompts, params)
    assert [s[0].completion.token_ids for s in seqs] == [r.token_ids for r in ref]
    _assert_all_freed(core)


def test_shared_prefix_hits_the_cache_and_changes_nothing(engine):
    rng = random.Random(2)
    system = [rng.randrange(3, 259) for _ in range(40)]
    prompts = [system + [rng.randrange(3, 259) for _ in range(rng.randint(1, 9))] for _ in range(6)]
    params = [SamplingParams(max_tokens=6, ignore_eos=True) for _ in prompts]
    ref = _reference(engine, prompts, params)
    config = ServeConfig(block_size=8, num_blocks=64)
    core = ServeEngine(engine, config)
    outs = []
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):  # one after another: later ones hit
        outs.append(core.add_request(str(i), p, sp)[0])
        core.run_until_done()
    assert [s.completion.token_ids for s in outs] == [r.token_ids for r in ref]
    assert core.allocator.hits == 5 * 40  # 5 full blocks of the shared prefix, for each later request
    _assert_all_freed(core)
    off = ServeEngine(engine, ServeConfig(block_size=8, num_blocks=64, prefix_caching=False))
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        off.add_request(str(i), p, sp)
        off.run_until_done()
    assert off.allocator.hits == 0


def test_a_prefix_sent_by_many_clients_at_once_is_computed_once(engine):
    rng = random.Random(4)
    system = [rng.randrange(3, 259) for _ in range(40)]
    prompts = [system + [rng.randrange(3, 259) for _ in range(3)] for _ in range(4)]
    params = [SamplingParams(max_tokens=4, ignore_eos=True) for _ in prompts]
    ref = _reference(engine, prompts, params)
    core, seqs = _serve(engine, ServeConfig(block_size=8, num_blocks=64), prompts, params)
    assert [s[0].completion.token_ids for s in seqs] == [r.token_ids for r in ref]
    # the first request computes the 5 shared blocks; the other three wait one step and hit all of them
    assert core.allocator.hits == 3 * 40
    _assert_all_freed(core)


def test_sampled_requests_with_n_match_generate_seed_for_seed(engine):
    prompt = list(b"Once upon a time")
    params = SamplingParams(
        max_tokens=10, temperature=0.9, top_k=50, top_p=0.95, seed=7, n=3, ignore_eos=True
    )
    ref = generate(engine, [Request(prompt, params)])
    core = ServeEngine(engine, ServeConfig(block_size=4, num_blocks=32))
    seqs = core.add_request("a", prompt, params)
    core.run_until_done()
    assert [s.completion.token_ids for s in seqs] == [r.token_ids for r in ref]
    assert len({tuple(s.completion.token_ids) for s in seqs}) > 1  # different seeds, different samples
    _assert_all_freed(core)


def test_stop_strings_and_penalties_behave_as_in_generate(engine):
    prompt = list(b"abcabcabc")
    params = SamplingParams(max_tokens=20, stop=("a",), repetition_penalty=1.3, frequency_penalty=0.5)
    ref = generate(engine, [Request(prompt, params)])[0]
    core = ServeEngine(engine, ServeConfig(block_size=4, num_blocks=16))
    (seq,) = core.add_request("a", prompt, params)
    core.run_until_done()
    assert (seq.completion.text, seq.completion.finish_reason) == (ref.text, ref.finish_reason)


def test_long_prefill_is_chunked_alongside_running_decodes(engine):
    core = ServeEngine(engine, ServeConfig(block_size=4, num_blocks=64, max_num_batched_tokens=8))
    core.add_request("short", [5, 6, 7], SamplingParams(max_tokens=30, ignore_eos=True))
    core.step()  # the short prompt is prefilled and starts decoding
    core.add_request("long", list(range(3, 60)), SamplingParams(max_tokens=2, ignore_eos=True))
    seen = []
    while "long" in core.requests:
        before = {s.request_id: len(s.completion.token_ids) for s in core.scheduler.running}
        core.step()
        seen.append(before)
    # The 57-token prompt took ceil(57 / 7) = 9 steps with a 7-token chunk each, and the decode of
    # "short" went on in every one of them (one token per step).
    short_counts = [b["short"] for b in seen if "short" in b]
    assert short_counts == list(range(short_counts[0], short_counts[0] + len(short_counts)))
    assert len(seen) >= 9
    core.run_until_done()
    _assert_all_freed(core)


def test_abort_frees_blocks(engine):
    core = ServeEngine(engine, ServeConfig(block_size=4, num_blocks=16))
    core.add_request("a", list(range(3, 20)), SamplingParams(max_tokens=50, ignore_eos=True))
    core.step()
    assert core.allocator.num_used > 0
    core.abort("a")
    _assert_all_freed(core)


def test_prompts_that_cannot_fit_are_refused(engine):
    core = ServeEngine(engine, ServeConfig(block_size=4, num_blocks=8))  # 32 tokens of cache
    with pytest.raises(RequestError, match="at most 31"):
        core.add_request("a", list(range(3, 40)), SamplingParams())
    with pytest.raises(RequestError, match="empty"):
        core.add_request("b", [], SamplingParams())
    (seq,) = core.add_request("c", list(range(3, 23)), SamplingParams(max_tokens=100, ignore_eos=True))
    core.run_until_done()
    assert len(seq.completion.token_ids) == 12  # capped at what the cache can hold


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton paged-attention kernel)")
def test_on_cuda_the_triton_decode_path_matches_generate(tiny_model):
    engine = load_engine(str(tiny_model), device="cuda", dtype="float32")
    prompts, params = _workload(32, seed=3)
    ref = _reference(engine, prompts, params)
    config = ServeConfig(block_size=16, num_blocks=48, max_num_seqs=16, max_num_batched_tokens=64)
    core, seqs = _serve(engine, config, prompts, params)
    same = sum(s[0].completion.token_ids == r.token_ids for s, r in zip(seqs, ref, strict=True))
    assert same == len(ref), f"{len(ref) - same} of {len(ref)} requests differ"
    _assert_all_freed(core)


def test_prompt_logprobs_are_the_same_whatever_the_chunking_and_skip_the_prefix_cache(engine):
    prompt = list(range(10, 40))
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    results = []
    for budget in (64, 7):  # whole prompt in one step, then 7-token chunks
        core = ServeEngine(engine, ServeConfig(block_size=4, num_blocks=32, max_num_batched_tokens=budget))
        core.add_request("warm", prompt, params)  # fills the prefix cache with this prompt's blocks
        core.run_until_done()
        (seq,) = core.add_request("a", prompt, params, prompt_logprobs=2)
        hits = core.allocator.hits
        core.run_until_done()
        assert core.allocator.hits == hits  # computed in full: the cached blocks have no logits
        assert len(seq.prompt_token_logprobs) == len(prompt) - 1 == len(seq.prompt_top_logprobs)
        results.append(seq)
    a, b = results
    assert b.prompt_token_logprobs == pytest.approx(a.prompt_token_logprobs, abs=1e-5)
    assert all(v <= 0 for v in a.prompt_token_logprobs)
    assert a.completion.token_ids == b.completion.token_ids
