"""Tool calling: which tools are offered, how they reach the prompt, how calls are parsed from a reply."""

import json

import pytest

from llmctl.core.serve.tools import check_tools, parse_tool_calls, select_tools, with_tool_system_prompt

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


def test_hermes_tool_call_blocks_become_openai_tool_calls():
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, calls = parse_tool_calls(text, {"get_weather"})
    assert content == "Let me check."
    assert len(calls) == 1 and calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}


def test_several_calls_and_a_bare_json_reply():
    text = (
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    )
    content, calls = parse_tool_calls(text, None)
    assert content is None and [c["function"]["name"] for c in calls] == ["get_time", "get_weather"]
    content, calls = parse_tool_calls(' {"name": "get_time", "arguments": {"tz": "UTC"}} ', {"get_time"})
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"tz": "UTC"}


@pytest.mark.parametrize(
    "text",
    [
        "The weather is fine.",
        "<tool_call>{not json}</tool_call>",
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',  # not an offered tool
        '{"answer": 42}',
    ],
)
def test_replies_without_a_valid_call_stay_text(text):
    assert parse_tool_calls(text, {"get_weather"}) == (text, [])


def test_tool_choice_selects_the_offered_tools():
    assert select_tools([WEATHER, TIME], None) == [WEATHER, TIME]
    assert select_tools([WEATHER, TIME], "auto") == [WEATHER, TIME]
    assert select_tools([WEATHER, TIME], "none") == []
    assert select_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}) == [TIME]
    with pytest.raises(ValueError, match="not among the tools"):
        select_tools([WEATHER], {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ValueError):
        select_tools([WEATHER], "sometimes")
    with pytest.raises(ValueError):
        check_tools([{"type": "function", "function": {"description": "no name"}}])


def test_tool_descriptions_join_the_system_message():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}]
    out = with_tool_system_prompt(messages, [WEATHER])
    assert out[0]["content"].startswith("Be brief.") and '"get_weather"' in out[0]["content"]
    assert "<tool_call>" in out[0]["content"] and out[1:] == messages[1:]
    assert with_tool_system_prompt(messages[1:], [WEATHER])[0]["role"] == "system"
