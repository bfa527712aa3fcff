"""eval's definitions, checked against hand-computed values and against direct computation."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmctl.core.errors import InputDataError, UsageError
from llmctl.core.eval import metrics as M
from llmctl.core.eval.runner import EvalOptions, fewshot_contexts
from llmctl.core.eval.scoring import Scorer
from llmctl.core.eval.tasks import doc_choices, doc_target, load_task, parse_task


@pytest.fixture(scope="module")
def scorer(tiny_model):
    from llmctl.core.models.hf import load_model, load_tokenizer, resolve_model

    ref = resolve_model(tiny_model)
    return Scorer(load_model(ref, device="cpu"), load_tokenizer(ref), max_length=16, batch_size=3)


# -- metrics ---------------------------------------------------------------------------------------------
def test_acc_and_acc_norm_follow_lm_evals_definitions():
    # raw argmax picks choice 0; per-character normalisation picks the long choice 1
    lls, choices = [-4.0, -6.0, -9.0], ["ab", "abcdef", "abc"]
    assert M.multiple_choice(lls, choices, gold=1) == {"acc": 0.0, "acc_norm": 1.0}
    assert M.multiple_choice([-1.0, -1.0], ["a", "b"], gold=0)["acc"] == 1.0  # ties: first index


def test_stderr_perplexities_and_bits_per_byte_by_hand():
    # mean 0.75; squared deviations sum to 0.75; / (n - 1) = 0.25; sqrt = 0.5; / sqrt(4) = 0.25
    assert M.mean_stderr([1, 0, 1, 1]) == pytest.approx(0.25)
    pairs = [(-10.0, 4), (-6.0, 4)]
    assert M.weighted_perplexity(pairs) == pytest.approx(math.exp(2.0))
    assert M.bits_per_byte(pairs) == pytest.approx(2.0 / math.log(2))
    assert M.words_of("a  b\tc\nd") == 4


def test_exact_match_and_gsm8k_filters():
    response = "She sells 9 eggs.\n#### 1,080\n\nQuestion: next"
    strict = M.apply_filters(response, [{"function": "regex", "regex_pattern": r"#### (\-?[0-9\.\,]+)"}])
    flexible = M.apply_filters(response, [{"function": "regex", "group_select": -1,
                                           "regex_pattern": r"(-?[$0-9.,]{2,})|(-?[0-9]+)"}])  # fmt: skip
    assert strict == "1,080" and flexible == "1,080"
    ignore = [",", "\\$", "(?s).*#### ", "\\.$"]
    assert M.exact_match(strict, "Natalia sold 48/2 = 24 clips.\n#### 1080", regexes_to_ignore=ignore) == 1.0
    assert M.exact_match("[invalid]", "#### 3", regexes_to_ignore=ignore) == 0.0
    assert M.exact_match("ABC!", "abc", ignore_case=True, ignore_punctuation=True) == 1.0


def test_expected_calibration_error_by_hand():
    # two bins used: (0.6, 0.667] holds 0.65 x2 (acc 0.5), (0.933, 1] holds 0.95 x2 (acc 1.0)
    ece = M.expected_calibration_error([0.65, 0.65, 0.95, 0.95], [1, 0, 1, 1])
    assert ece == pytest.approx(0.5 * abs(0.5 - 0.65) + 0.5 * abs(1.0 - 0.95))


# -- scoring ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 15, 16, 17, 40])
@pytest.mark.parametrize("stride", [None, 5])
def test_windows_score_every_token_exactly_once(scorer, n, stride):
    tokens = list(range(10, 10 + n))
    windows = scorer.windows(tokens, stride)
    assert sum((targets for _, targets in windows), []) == tokens
    for inp, targets in windows:
        assert len(inp) <= scorer.max_length
        full = [scorer.prefix_token_id] + tokens
        start = full.index(inp[0]) if inp[0] != scorer.prefix_token_id else 0
        # the last len(targets) inputs are exactly the tokens preceding each target
        assert full[start + len(inp) - len(targets) + 1 : start + len(inp) + 1] == targets


def test_rolling_loglikelihood_equals_direct_computation(scorer):
    text = "hello world, this is a test of rolling windows"
    tokens = scorer.encode(text)
    ((ll, n),) = scorer.rolling_loglikelihoods([text])
    expected = 0.0
    for inp, targets in scorer.windows(tokens):
        with torch.no_grad():
            logits = scorer.model(torch.tensor([inp])).logits[0]
        logp = F.log_softmax(logits[len(inp) - len(targets) :].float(), -1)
        expected += float(logp.gather(-1, torch.tensor(targets)[:, None]).sum())
    assert n == len(tokens) and len(tokens) > scorer.max_length
    assert ll == pytest.approx(expected, rel=1e-5)


def test_shared_context_scoring_equals_scoring_each_pair_alone(scorer):
    scorer = Scorer(scorer.model, scorer.tokenizer, max_length=128)  # no truncation: the pair fits
    context = "Question: which is right?\nAnswer:"
    choices = [" yes", " no it is not", " maybe so"]
    shared = scorer.choice_loglikelihoods(context, choices)
    for (ll, greedy), choice in zip(shared, choices, strict=True):
        alone = scorer._single(*scorer.encode_pair(context, choice))
        assert ll == pytest.approx(alone[0], rel=1e-5, abs=1e-4) and greedy == alone[1]


def test_trailing_context_spaces_move_to_the_continuation(scorer):
    ctx, cont = scorer.encode_pair("Answer: ", "yes")
    assert ctx == scorer.encode("Answer:") and ctx + cont == scorer.encode("Answer: yes")
    assert scorer.encode_pair("", "yes")[0] == [scorer.prefix_token_id]


# -- tasks -----------------------------------------------------------------------------------------------
def test_lm_eval_style_yaml_with_local_json_and_templates(tmp_path):
    data = tmp_path / "piqa.jsonl"
    data.write_text('{"goal": "g", "sol1": "a", "sol2": "b", "label": 1}\n')
    (tmp_path / "t.yaml").write_text(
        "task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: piqa.jsonl\n"
        "output_type: multiple_choice\ndoc_to_text: 'Q: {{goal}}'\ndoc_to_choice: '{{[sol1, sol2]}}'\n"
        "doc_to_target: label\n"
    )
    task = load_task(str(tmp_path / "t.yaml"))
    doc = {"goal": "g", "sol1": "a", "sol2": "b", "label": 1}
    assert task.data_files["test"] == str(tmp_path / "piqa.jsonl")
    assert doc_choices(task, doc) == ["a", "b"] and doc_target(task, doc) == 1


def test_missing_template_field_and_bad_answers_are_input_errors():
    task = load_task("arc")
    with pytest.raises(InputDataError, match="question"):
        fewshot_contexts(task, [{"query": "x", "choices": ["a"], "answer": 0}], EvalOptions())
    with pytest.raises(InputDataError, match="not an index"):
        doc_target(task, {"question": "q", "choices": ["a", "b"], "answer": 5})


def test_unknown_tasks_are_input_errors_and_hub_datasets_usage_errors():
    with pytest.raises(InputDataError, match="unknown task"):
        load_task("no-such-task")
    with pytest.raises(UsageError, match="download"):
        parse_task({"task": "x", "dataset_path": "openai/gsm8k", "output_type": "generate_until"}, "<t>")


def test_fewshot_examples_are_reproducible_and_exclude_the_document(tmp_path):
    task = load_task("arc")
    docs = [{"question": f"q{i}", "choices": ["a", "b"], "answer": i % 2} for i in range(12)]
    path = tmp_path / "d.jsonl"
    import json

    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    opts = EvalOptions(data=str(path), fewshot_data=str(path), num_fewshot=3, seed=7)
    a, b = fewshot_contexts(task, docs, opts), fewshot_contexts(task, docs, opts)
    assert a == b
    assert (
        fewshot_contexts(
            task, docs, EvalOptions(data=str(path), fewshot_data=str(path), num_fewshot=3, seed=8)
        )
        != a
    )
    for doc, context in zip(docs, a, strict=True):
        shots = context.split("\n\n")
        assert len(shots) == 4 and shots[-1] == f"Question: {doc['question']}\nAnswer:"
        assert all(f"Question: {doc['question']}\n" not in s for s in shots[:-1])


def test_fitted_temperature_undoes_a_known_sharpening():
    import random

    from llmctl.core.eval.runner import fit_temperature

    rng = random.Random(0)
    lls, golds = [], []
    for _ in range(400):
        logits = [rng.gauss(0, 1) for _ in range(4)]
        probs = [math.exp(x) for x in logits]
        gold = rng.choices(range(4), weights=probs)[0]  # gold drawn from softmax(logits): calibrated at T=1
        lls.append([3.0 * x for x in logits])  # an over-confident model: logits sharpened 3x
        golds.append(gold)
    assert fit_temperature(lls, golds) == pytest.approx(3.0, rel=0.25)
