"""Tool-call parsing and streaming (preft.server.tools) without a model: every split of the text into
deltas gives the calls and content of the whole text; the chat-template rendering of tools."""

from __future__ import annotations

import json

import pytest

from preft.server.protocol import APIError, ChatMessage
from preft.server.tools import ToolPlan, template_messages

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}},
]
AUTO_TEXT = (
    "Let me check. <tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    "</tool_call>\n<tool_call>\n"
    '{"name": "add", "arguments": {"a": 1}}\n'
    "</tool_call>"
)


def reassemble(deltas: list[dict]) -> tuple[str, list[tuple[str, str]]]:
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, list[str]] = {}
    for d in deltas:
        for part in d.get("tool_calls", ()):
            call = calls.setdefault(part["index"], ["", ""])
            call[0] += part.get("function", {}).get("name", "")
            call[1] += part.get("function", {}).get("arguments", "")
    return content, [tuple(calls[i]) for i in sorted(calls)]


@pytest.mark.parametrize("piece", [1, 2, 3, 7, len(AUTO_TEXT)])
def test_auto_tool_calls_streamed_in_any_pieces_equal_the_parsed_whole(piece):
    plan = ToolPlan.from_request(TOOLS, "auto", None)
    content, calls, finish = plan.parse(AUTO_TEXT, "stop")
    assert content == "Let me check. " and finish == "tool_calls"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("add", {"a": 1}),
    ]
    assert len({c["id"] for c in calls}) == 2
    stream = plan.stream()
    deltas = []
    for start in range(0, len(AUTO_TEXT), piece):
        deltas += stream.feed(AUTO_TEXT[start : start + piece])
    deltas += stream.finish()
    assert reassemble(deltas) == ("Let me check. ", [(c["function"]["name"], c["function"]["arguments"]) for c in calls])
    assert all("<" not in d.get("content", "") for d in deltas)  # a held-back tag never leaks as content


def test_auto_keeps_text_that_is_not_a_call_of_a_known_tool_and_one_call_without_parallel_calls():
    plan = ToolPlan.from_request(TOOLS, None, False)
    unknown = '<tool_call>{"name": "rm", "arguments": {}}</tool_call>'
    assert plan.parse("a < b and " + unknown, "stop") == ("a < b and " + unknown, [], "stop")
    content, calls, _ = plan.parse(AUTO_TEXT, "stop")
    assert [c["function"]["name"] for c in calls] == ["get_weather"] and "add" in content
    content, calls, _ = plan.parse('<tool_call>{"name": "add", "arguments": {"a": 2}}', "stop")  # unclosed at the end
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"a": 2}


def test_required_and_named_grammars_and_their_parsing():
    required = ToolPlan.from_request(TOOLS, "required", False)
    spec = required.spec()["json"]
    assert spec["maxItems"] == 1 and [c["properties"]["name"]["const"] for c in spec["items"]["anyOf"]] == ["get_weather", "add"]
    _, calls, finish = required.parse('[{"name": "add", "arguments": {"a": 3}}]', "stop")
    assert finish == "tool_calls" and json.loads(calls[0]["function"]["arguments"]) == {"a": 3}
    assert required.parse('[{"name": "add", "argu', "length") == ('[{"name": "add", "argu', [], "length")
    named = ToolPlan.from_request(TOOLS, {"type": "function", "function": {"name": "add"}}, None)
    assert named.spec() == {"json": TOOLS[1]["function"]["parameters"]}
    assert named.parse('{"a": 4}', "stop")[1][0]["function"] == {"name": "add", "arguments": '{"a": 4}'}
    assert ToolPlan.from_request(TOOLS, "none", None) is None and ToolPlan.from_request(None, None, None) is None


@pytest.mark.parametrize(
    "tools, choice",
    [(None, "auto"), (TOOLS, "sometimes"), (TOOLS, {"type": "function", "function": {"name": "nope"}}), ([TOOLS[0], TOOLS[0]], "auto")],
)
def test_bad_tools_or_tool_choice_are_400s_naming_the_field(tools, choice):
    with pytest.raises(APIError) as error:
        ToolPlan.from_request(tools, choice, None)
    assert error.value.status == 400 and error.value.param in ("tools", "tool_choice")


def test_a_template_without_tools_gets_the_hermes_prompt_calls_and_tool_responses():
    plan = ToolPlan.from_request(TOOLS, "auto", None)
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    messages = [
        ChatMessage(role="user", content="add 1"),
        ChatMessage(role="assistant", content=None, tool_calls=[call]),
        ChatMessage(role="tool", tool_call_id="call_1", content="1"),
    ]
    rendered, extra = template_messages(messages, "{{ message['content'] }}", plan)
    assert extra == {} and rendered[0]["role"] == "system" and json.dumps(TOOLS[0]) in rendered[0]["content"]
    assert rendered[2]["content"] == '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'
    assert rendered[3] == {"role": "user", "content": "<tool_response>\n1\n</tool_response>"}


def test_a_template_that_renders_tools_gets_them_as_transformers_expects():
    plan = ToolPlan.from_request(TOOLS, "auto", None)
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    messages = [ChatMessage(role="assistant", tool_calls=[call]), ChatMessage(role="tool", tool_call_id="call_1", content="1")]
    rendered, extra = template_messages(messages, "{% if tools %}{{ tools }}{% endif %}", plan)
    assert extra == {"tools": TOOLS}
    assert rendered[0]["tool_calls"] == [{"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}]
    assert rendered[1] == {"role": "tool", "content": "1", "tool_call_id": "call_1"}
