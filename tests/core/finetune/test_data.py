"""Formats, label masking (hand-checked on the byte-level tokenizer: token id = byte + 3), truncation."""

from __future__ import annotations

import pytest

from llmctl.core.errors import InputDataError
from llmctl.core.finetune.data import ALPACA_NO_INPUT, IGNORE, PreferenceExample, Tokenize, detect_format
from llmctl.core.io import Record


@pytest.fixture(scope="module")
def tok(tiny_model):
    from llmctl.core.models.hf import load_tokenizer

    return load_tokenizer(tiny_model)


def b(text: str) -> list[int]:
    """Ids of ``text`` under llama-tiny's byte-level tokenizer."""
    return [x + 3 for x in text.encode()]


def rec(data: dict, line: int = 1) -> Record:
    return Record(data, "train.jsonl", line)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"text": "x"}, "text"),
        ({"prompt": "p", "completion": "c"}, "prompt-completion"),
        ({"messages": []}, "messages"),
        ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
        ({"prompt": "p", "chosen": "c", "rejected": "r"}, "preference"),
    ],
)
def test_format_is_detected_from_the_fields(fields, expected):
    assert detect_format(fields) == expected


def test_unknown_fields_are_an_input_error_listing_the_formats():
    with pytest.raises(InputDataError, match="prompt/completion"):
        detect_format({"foo": 1})


def test_prompt_completion_trains_only_on_completion_and_eos(tok):
    ex = Tokenize(tok).example(rec({"prompt": "Hi", "completion": " yo"}))
    eos = tok.eos_token_id
    assert ex.input_ids == b("Hi") + b(" yo") + [eos]
    assert ex.labels == [IGNORE, IGNORE] + b(" yo") + [eos]


def test_train_on_prompt_trains_on_every_token(tok):
    ex = Tokenize(tok, train_on_prompt=True).example(rec({"prompt": "Hi", "completion": " yo"}))
    assert ex.labels == ex.input_ids


def test_text_records_train_on_everything_with_eos(tok):
    ex = Tokenize(tok).example(rec({"text": "abc"}))
    assert ex.input_ids == ex.labels == b("abc") + [tok.eos_token_id]


def test_messages_train_only_on_assistant_turns_through_the_chat_template(tok):
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "ok"},
    ]
    ex = Tokenize(tok).example(rec({"messages": messages}))
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(messages, tokenize=False)
    trained = [i for i, label in zip(ex.input_ids, ex.labels, strict=True) if label != IGNORE]
    # each assistant turn's content and its end-of-turn marker, nothing of the system/user turns
    assert tok.decode(trained) == "yo<|im_end|>\nok<|im_end|>\n"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    first = ex.labels.index(b("y")[0])
    assert ex.labels[first : first + 4] == b("yo") + [im_end] + b("\n")
    assert all(label == IGNORE for label in ex.labels[:first])


def test_alpaca_uses_the_alpaca_prompt_and_trains_on_the_output(tok):
    ex = Tokenize(tok).example(rec({"instruction": "Add", "input": "", "output": "4"}))
    prompt = ALPACA_NO_INPUT.format(instruction="Add")
    assert ex.input_ids == b(prompt) + b("4") + [tok.eos_token_id]
    assert ex.labels == [IGNORE] * len(b(prompt)) + b("4") + [tok.eos_token_id]


def test_preference_records_give_two_masked_sequences(tok):
    ex = Tokenize(tok).example(rec({"prompt": "Q", "chosen": "a", "rejected": "bc"}))
    assert isinstance(ex, PreferenceExample)
    eos = tok.eos_token_id
    assert ex.chosen.input_ids == b("Q") + b("a") + [eos]
    assert ex.chosen.labels == [IGNORE] + b("a") + [eos]
    assert ex.rejected.labels == [IGNORE] + b("bc") + [eos]


@pytest.mark.parametrize("missing", ["chosen", "rejected"])
def test_a_preference_record_missing_a_side_names_file_and_line(tok, missing):
    data = {"prompt": "Q", "chosen": "a", "rejected": "b"}
    data[missing] = ""
    with pytest.raises(InputDataError, match=rf"train.jsonl:7: .*missing '{missing}'"):
        Tokenize(tok).example(rec(data, line=7))


def test_an_example_whose_labels_are_all_masked_is_an_error_not_a_zero_loss(tok):
    # the prompt alone fills --max-length: truncation leaves nothing to learn
    with pytest.raises(InputDataError, match=r"train.jsonl:3: every label .* masked after truncation"):
        Tokenize(tok, max_length=4).example(rec({"prompt": "long prompt", "completion": "c"}, line=3))


def test_an_empty_completion_without_eos_is_all_masked(tok):
    t = Tokenize(tok, add_eos=False)
    with pytest.raises(InputDataError, match="every label"):
        t.example(rec({"prompt": "p", "completion": ""}))


def test_a_dataset_with_nothing_left_after_skipping_is_an_error(tok):
    records = [rec({"prompt": "long prompt", "completion": "c"}, line=i) for i in (1, 2)]
    t = Tokenize(tok, max_length=3)
    with pytest.raises(InputDataError, match="empty"):
        t.all(records, skip_bad_lines=True)
    assert t.stats.skipped == 2


def test_truncation_is_counted(tok):
    t = Tokenize(tok, max_length=5)
    out = t.all([rec({"text": "abcdefgh"}), rec({"text": "ab"})])
    assert [len(e.input_ids) for e in out] == [5, 3]
    assert t.stats.truncated == 1


def test_records_of_another_format_mid_file_are_an_error(tok):
    t = Tokenize(tok)
    with pytest.raises(
        InputDataError, match="train.jsonl:2: .*prompt-completion format but earlier ones are text"
    ):
        t.all([rec({"text": "a"}, 1), rec({"prompt": "p", "completion": "c"}, 2)])


def test_a_preference_prompt_may_be_a_conversation_rendered_with_the_chat_template(tok):
    prompt = [{"role": "user", "content": "hi"}]
    ex = Tokenize(tok).example(rec({"prompt": prompt, "chosen": "yo", "rejected": "no"}))
    rendered = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert tok.decode(ex.chosen.input_ids) == rendered + "yo" + tok.eos_token
    n = len(tok(rendered, add_special_tokens=False)["input_ids"])
    assert ex.chosen.labels[:n] == [IGNORE] * n and ex.chosen.labels[n:] == b("yo") + [tok.eos_token_id]


def test_a_first_token_alone_is_not_trainable(tok):
    # a one-token document has a label but nothing predicts it: that is an all-masked example too
    with pytest.raises(InputDataError, match="train.jsonl:1: every label"):
        Tokenize(tok).example(rec({"text": ""}))
