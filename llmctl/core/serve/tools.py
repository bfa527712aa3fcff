"""Tool calling for the chat API: tools rendered into the prompt, tool calls parsed out of the reply.

Rendering: the tools go to the chat template (``apply_chat_template(..., tools=...)``); a template that
never mentions ``tools`` (SmolLM2's, for one) would drop them silently, so for those the tool list is put
into the system message in the Hermes / Qwen2.5 format that most open models are tuned on::

    <tools>
    {"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}
    </tools>
    ... reply with <tool_call>{"name": <function-name>, "arguments": <args-json-object>}</tool_call>

Parsing: every ``<tool_call>{...}</tool_call>`` block of the reply (or a reply that is, as a whole, one
JSON object with ``name`` and ``arguments``) becomes an OpenAI ``tool_calls`` entry; the text around the
blocks stays the message content.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)

HERMES_SYSTEM = (
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n"
    "<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def select_tools(tools: list[dict] | None, tool_choice: Any) -> list[dict]:
    """The tools the model is offered: none for ``tool_choice="none"``, one for a named function."""
    if not tools or tool_choice == "none":
        return []
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        chosen = [t for t in tools if (t.get("function") or {}).get("name") == name]
        if not chosen:
            raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools")
        return chosen
    if tool_choice not in (None, "auto", "required"):
        raise ValueError("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', ...}")
    return tools


def check_tools(tools: list[dict]) -> None:
    for t in tools:
        fn = t.get("function") if isinstance(t, dict) else None
        if (
            t.get("type", "function") != "function"
            or not isinstance(fn, dict)
            or not isinstance(fn.get("name"), str)
        ):
            raise ValueError("each tool must be {'type': 'function', 'function': {'name': ..., ...}}")


def template_takes_tools(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return "tools" in (template if isinstance(template, str) else json.dumps(template))


def with_tool_system_prompt(messages: list[dict], tools: list[dict]) -> list[dict]:
    """Messages with the Hermes tool description prepended to (or added as) the system message."""
    text = HERMES_SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def parse_tool_calls(text: str, tool_names: set[str] | None = None) -> tuple[str | None, list[dict]]:
    """``(content, tool_calls)`` of a reply; ``tool_calls`` in OpenAI's shape (arguments as a JSON string).

    A block that is not valid JSON, or names a function not offered, is left in the content."""
    calls: list[dict] = []
    spans: list[tuple[int, int]] = []
    for m in _BLOCK.finditer(text):
        call = _as_call(m.group(1), tool_names)
        if call is not None:
            calls.append(call)
            spans.append(m.span())
    if not calls:
        call = _as_call(text.strip(), tool_names)
        if call is not None:
            return None, [call]
        return text, []
    content = "".join(
        text[a:b]
        for a, b in zip([0] + [e for _, e in spans], [s for s, _ in spans] + [len(text)], strict=True)
    )
    return (content.strip() or None), calls


def _as_call(blob: str, tool_names: set[str] | None) -> dict | None:
    try:
        obj = json.loads(blob)
    except (json.JSONDecodeError, ValueError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if tool_names is not None and obj["name"] not in tool_names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": obj["name"], "arguments": args if isinstance(args, str) else json.dumps(args)},
    }
