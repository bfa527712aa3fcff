"""The batched attention of short runs (drafts being verified) against the per-sequence reference."""

import random

import torch

from llmctl.core.serve.runner import StepInput, _prefill_attention, _ShortRows


def test_short_runs_in_one_batch_match_the_per_sequence_reference():
    rng = random.Random(0)
    torch.manual_seed(0)
    num_blocks, block_size, kv_heads, heads, dim = 40, 4, 2, 6, 8  # GQA: 3 query heads per kv head
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim)
    free = list(range(num_blocks))
    rng.shuffle(free)
    step = StepInput([], [], [], [])
    for _ in range(5):
        start, n = rng.randint(0, 20), rng.randint(2, 6)
        table = [
            free.pop() for _ in range(-(-(start + n) // block_size) + rng.randint(0, 1))
        ]  # may be longer
        step.token_ids.append([0] * n)
        step.starts.append(start)
        step.tables.append(table)
        step.want_logits.append(True)
    offsets = [0]
    for toks in step.token_ids:
        offsets.append(offsets[-1] + len(toks))
    q = torch.randn(offsets[-1], heads, dim)
    rows = list(range(len(step.token_ids)))
    short = _ShortRows(step, rows, offsets, block_size, "cpu")
    got = torch.empty_like(q)
    got[short.flat] = short.attention(q, k_cache, v_cache, dim**-0.5)
    for i in rows:
        a, b = offsets[i], offsets[i + 1]
        want = _prefill_attention(q[a:b], k_cache, v_cache, step.tables[i], step.starts[i], dim**-0.5)
        torch.testing.assert_close(got[a:b], want, atol=1e-5, rtol=1e-5)


def test_the_engine_with_batched_short_runs_gives_the_same_greedy_tokens(tiny_model, monkeypatch):
    """The GPU's batching of short runs, forced on the CPU: speculative serving still equals generate."""
    from llmctl.core.generate.engine import Request, generate
    from llmctl.core.generate.run import load_engine
    from llmctl.core.generate.sampling import SamplingParams
    from llmctl.core.serve import runner
    from llmctl.core.serve.engine import ServeConfig, ServeEngine

    monkeypatch.setattr(runner, "BATCHED_SHORT_ROWS_ON", {"cpu"})
    engine = load_engine(str(tiny_model))
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 259) for _ in range(rng.randint(2, 30))] for _ in range(8)]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    core = ServeEngine(engine, ServeConfig(block_size=4, num_blocks=80, num_draft_tokens=3), draft=engine)
    seqs = [core.add_request(str(i), p, params)[0] for i, p in enumerate(prompts)]
    core.run_until_done()
    assert core.spec_stats()["spec_decode_num_draft_tokens"] > 0
    assert [s.completion.token_ids for s in seqs] == [
        generate(engine, [Request(p, params)])[0].token_ids for p in prompts
    ]
