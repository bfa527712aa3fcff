"""Beam search against transformers' ``generate(num_beams=...)``: same hypotheses, same order, same scores."""

from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmctl.core.errors import UsageError
from llmctl.core.generate.beam import BeamParams, generate_beam
from llmctl.core.generate.engine import Request
from llmctl.core.generate.run import load_engine
from llmctl.core.generate.sampling import SamplingParams
from tests.core.generate._models import sharp_llama

PROMPTS = ["Hello", "The quick brown fox", "a b c d e f"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random llama with sharpened weights (clear winners, distinct beams) and an EOS it emits."""
    directory = sharp_llama(tmp_path_factory.mktemp("beam") / "m", seed=3)
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    engine = load_engine(str(directory), device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    # The EOS: a token the beams produce early, so hypotheses end at different lengths and steps.
    engine.eos_token_ids = set()
    seen = Counter()
    for prompt in PROMPTS:
        request = Request(tokenizer(prompt)["input_ids"], SamplingParams(max_tokens=6, n=4))
        for c in generate_beam(engine, request, BeamParams(4)):
            seen.update(c.token_ids[1:4])
    eos = seen.most_common(1)[0][0]
    engine.eos_token_ids = {eos}
    return engine, tokenizer, hf, eos


def _hf_beams(hf, ids, eos, *, num_beams, max_new, n, length_penalty, early_stopping, repetition_penalty=1.0):
    out = hf.generate(
        torch.tensor([ids]), num_beams=num_beams, num_return_sequences=n, do_sample=False,
        max_new_tokens=max_new, length_penalty=length_penalty, early_stopping=early_stopping,
        repetition_penalty=repetition_penalty, eos_token_id=eos, pad_token_id=eos,
        output_scores=True, return_dict_in_generate=True,
    )  # fmt: skip
    results = []
    for row, score in zip(out.sequences, out.sequences_scores, strict=True):
        tokens = row[len(ids) :].tolist()
        finish = "length"
        if eos in tokens:
            tokens = tokens[: tokens.index(eos)]
            finish = "stop"
        results.append((tokens, finish, float(score)))
    return results


@pytest.mark.parametrize(
    "num_beams,n,length_penalty,early_stopping",
    [(4, 4, 1.0, "false"), (3, 2, 0.0, "true"), (4, 1, 2.0, "never"), (2, 2, -0.5, "false")],
)
def test_beam_search_returns_transformers_hypotheses_and_scores(
    setup, num_beams, n, length_penalty, early_stopping
):
    engine, tokenizer, hf, eos = setup
    beam = BeamParams(num_beams, length_penalty, early_stopping).validate()
    finishes = Counter()
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        ours = generate_beam(engine, Request(ids, SamplingParams(max_tokens=10, n=n)), beam)
        theirs = _hf_beams(hf, ids, eos, num_beams=num_beams, max_new=10, n=n, length_penalty=length_penalty,
                           early_stopping=beam.hf_early_stopping)  # fmt: skip
        assert [(c.token_ids, c.finish_reason) for c in ours] == [(t, f) for t, f, _ in theirs], prompt
        assert [c.score for c in ours] == pytest.approx([s for _, _, s in theirs], rel=1e-4, abs=1e-4)
        finishes.update(c.finish_reason for c in ours)
    if length_penalty <= 0:  # short hypotheses win: some ended at EOS, so the test exercises finishing
        assert finishes["stop"] > 0


def test_beam_search_applies_the_repetition_penalty_to_log_probs_as_transformers_does(setup):
    engine, tokenizer, hf, eos = setup
    ids = tokenizer(PROMPTS[1])["input_ids"]
    params = SamplingParams(max_tokens=8, n=2, repetition_penalty=1.3)
    ours = generate_beam(engine, Request(ids, params), BeamParams(3))
    theirs = _hf_beams(hf, ids, eos, num_beams=3, max_new=8, n=2, length_penalty=1.0, early_stopping=False,
                       repetition_penalty=1.3)  # fmt: skip
    assert [c.token_ids for c in ours] == [t for t, _, _ in theirs]


def test_one_beam_is_greedy_decoding(setup):
    from llmctl.core.generate.engine import generate

    engine, tokenizer, _, _ = setup
    ids = tokenizer(PROMPTS[2])["input_ids"]
    greedy = generate(engine, [Request(ids, SamplingParams(max_tokens=10))])[0]
    beam = generate_beam(engine, Request(ids, SamplingParams(max_tokens=10)), BeamParams(1))[0]
    assert beam.token_ids == greedy.token_ids


def test_beam_search_refuses_sampling_and_more_returns_than_beams(setup):
    engine, tokenizer, _, _ = setup
    ids = tokenizer("x")["input_ids"]
    with pytest.raises(UsageError, match="temperature"):
        generate_beam(engine, Request(ids, SamplingParams(temperature=0.7)), BeamParams(2))
    with pytest.raises(UsageError, match="num-beams"):
        generate_beam(engine, Request(ids, SamplingParams(n=3)), BeamParams(2))
    with pytest.raises(UsageError, match="early-stopping"):
        BeamParams(2, early_stopping="sometimes").validate()
