"""Constrained decoding: every output of a tiny random model parses and validates (the model alone never
would); bad schemas, regexes and grammars are one-line errors."""

import json
import re

import jsonschema
import pytest

from llmctl.core.errors import InputDataError, UsageError
from llmctl.core.generate.constrained import Constraint, compiler_for
from llmctl.core.generate.engine import Request, generate
from llmctl.core.generate.run import encode_prompt, load_engine
from llmctl.core.generate.sampling import SamplingParams

SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "age", "ok"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
    {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
            "level": {"enum": ["low", "high", None]},
        },
        "required": ["tags", "level"],
        "additionalProperties": False,
    },
    {"enum": ["yes", "no"]},
]


@pytest.fixture(scope="module")
def engine(tiny_model):
    return load_engine(str(tiny_model), device="cpu")


def _run(engine, constraint, *, n=4, temperature=1.0, max_tokens=120, prompt="Data:"):
    ids = encode_prompt(engine, "text", prompt)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, n=n, seed=7)
    return generate(engine, [Request(ids, params, "test", constraint)])


@pytest.mark.parametrize("schema", SCHEMAS, ids=["object", "array-enum", "nested", "enum"])
def test_every_sampled_and_greedy_output_validates_against_the_schema(engine, schema):
    constraint = Constraint("json_schema", json.dumps(schema))
    outs = _run(engine, constraint) + _run(engine, constraint, n=1, temperature=0.0)
    for c in outs:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), schema)


def test_regex_outputs_match_in_full(engine):
    pattern = r"[a-z]{3}-[0-9]{2}"
    for c in _run(engine, Constraint("regex", pattern)):
        assert re.fullmatch(pattern, c.text), c.text


def test_gbnf_and_lark_grammars_constrain_the_output(engine):
    gbnf = 'root ::= "(" expr ")"\nexpr ::= term ("+" term)?\nterm ::= [0-9]'
    for c in _run(engine, Constraint("grammar", gbnf)):
        assert re.fullmatch(r"\([0-9](\+[0-9])?\)", c.text), c.text
    lark = 'start: ANSWER\nANSWER: "yes" | "no" | "maybe"'
    for c in _run(engine, Constraint("lark", lark)):
        assert c.text in ("yes", "no", "maybe")


def test_unconstrained_rows_in_the_same_batch_are_untouched(engine):
    ids = encode_prompt(engine, "text", "Data:")
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    alone = generate(engine, [Request(ids, params)])[0]
    mixed = generate(engine, [Request(ids, params), Request(ids, params, "x", Constraint("regex", "[ab]+"))])
    assert mixed[0].token_ids == alone.token_ids
    assert re.fullmatch("[ab]+", mixed[1].text)


@pytest.mark.parametrize(
    "constraint",
    [
        Constraint("json_schema", '{"type": "nonsense"}'),
        Constraint("regex", "[a-"),
        Constraint("grammar", "root ::= undefined_rule"),
    ],
)
def test_invalid_constraints_are_input_errors_naming_the_line(engine, constraint):
    with pytest.raises(InputDataError, match="p.jsonl:3: invalid"):
        compiler_for(engine).compile(constraint, "p.jsonl:3")


def test_response_format_maps_onto_constraints():
    assert Constraint.from_response_format({"type": "json_object"}) == Constraint("json")
    schema = {"type": "object"}
    got = Constraint.from_response_format(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    )
    assert got == Constraint("json_schema", json.dumps(schema))
    assert Constraint.from_response_format({"type": "text"}) is None
    with pytest.raises(ValueError):
        Constraint.from_response_format({"type": "xml"})


def test_flags_are_exclusive(tmp_path):
    with pytest.raises(UsageError, match="choose one"):
        Constraint.from_flags(None, True, "a+", None)
    bad = tmp_path / "s.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError, match="not JSON"):
        Constraint.from_flags(bad, False, None, None)
