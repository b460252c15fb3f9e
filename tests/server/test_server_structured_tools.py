"""Structured outputs, tool calls and OpenAI strictness on the real SmolLM2-135M-Instruct, through the
official ``openai`` client against a real uvicorn server on 127.0.0.1.

Every structured output must parse and validate against its schema; every constrained tool call must
name a given function with arguments valid against its parameters; streamed tool-call deltas, put
back together by index as a client does, must equal the non-streamed calls.
"""

from __future__ import annotations

import json
import logging
import re
import threading

import httpx
import jsonschema
import openai
import pytest
from server_helpers import ServerThread

from preft.engine import LLM
from preft.server.options import NOT_SUPPORTED

pytestmark = pytest.mark.real_model

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD}},
]
PARAMETERS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer"},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    },
    "required": ["name", "age", "hobbies"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(smollm2_dir):
    llm = LLM(str(smollm2_dir), dtype="float32", device="cpu", num_kv_blocks=96, max_model_len=1024, max_num_seqs=8)
    server = ServerThread(llm)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def chat(server, client, **kwargs):
    return client.chat.completions.create(model=server.state.model_name, **{"temperature": 0, **kwargs})


def streamed_tool_calls(stream) -> tuple[list[dict], str, str]:
    """A client's reassembly of streamed deltas: tool calls by index, the content, the finish reason."""
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for part in choice.delta.tool_calls or ():
                call = calls.setdefault(part.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = call["id"] or part.id
                call["name"] += part.function.name or "" if part.function else ""
                call["arguments"] += part.function.arguments or "" if part.function else ""
    return [calls[i] for i in sorted(calls)], content, finish


def assert_valid_call(name: str, arguments: str) -> None:
    assert name in PARAMETERS
    jsonschema.validate(json.loads(arguments), PARAMETERS[name])


# ---- structured outputs ----------------------------------------------------------------------


def test_response_format_json_schema_and_json_object_parse_and_validate_streamed_or_not(server, client):
    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    messages = [{"role": "user", "content": "Describe a person."}]
    answer = chat(server, client, messages=messages, response_format=schema_format, max_tokens=120)
    assert answer.choices[0].finish_reason == "stop", answer.choices[0].message.content
    jsonschema.validate(json.loads(answer.choices[0].message.content), PERSON)
    stream = chat(server, client, messages=messages, response_format=schema_format, max_tokens=120, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == answer.choices[0].message.content
    sampled = chat(server, client, messages=messages, response_format=schema_format, max_tokens=160, temperature=1.0, seed=3, n=2)
    for choice in sampled.choices:
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    favourite = [{"role": "user", "content": 'Give a JSON object with the key "color" and your favourite color.'}]
    anything = chat(server, client, messages=favourite, response_format={"type": "json_object"}, max_tokens=80)
    assert isinstance(json.loads(anything.choices[0].message.content), dict)


def test_vllm_guided_extras_constrain_chat_and_completions(server, client):
    messages = [{"role": "user", "content": "Is the sky blue?"}]
    choice = chat(server, client, messages=messages, max_tokens=8, extra_body={"guided_choice": ["yes", "no", "maybe"]})
    assert choice.choices[0].message.content in ("yes", "no", "maybe")
    pattern = r"[0-9]{3}-[0-9]{4}"
    regex = client.completions.create(
        model=server.state.model_name, prompt="My phone number is", max_tokens=12, temperature=0, extra_body={"guided_regex": pattern}
    )
    assert re.fullmatch(pattern, regex.choices[0].text) and regex.choices[0].finish_reason == "stop"
    newer = chat(server, client, messages=messages, max_tokens=8, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert newer.choices[0].message.content in ("yes", "no")
    as_text = chat(server, client, messages=messages, max_tokens=60, extra_body={"guided_json": json.dumps(PERSON)})
    jsonschema.validate(json.loads(as_text.choices[0].message.content), PERSON)


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": 5}}, "response_format"),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        ({"structured_outputs": {"json_schema": {}}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ],
)
def test_a_bad_structured_or_tool_option_is_a_400_naming_it(server, client, extra, param):
    with pytest.raises(openai.BadRequestError) as error:
        chat(server, client, messages=ASK, max_tokens=4, extra_body=extra)
    assert error.value.body["param"] == param, error.value.body


# ---- tool calls ------------------------------------------------------------------------------


def test_tool_calling_loop_with_a_named_function_then_the_tool_result(server, client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    first = chat(server, client, messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=60)
    assert first.choices[0].finish_reason == "tool_calls" and first.choices[0].message.content is None
    (call,) = first.choices[0].message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert_valid_call(call.function.name, call.function.arguments)

    calls, content, finish = streamed_tool_calls(
        chat(server, client, messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=60, stream=True)
    )
    assert finish == "tool_calls" and content == ""
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", call.function.arguments)] and calls[0]["id"]

    result = {"city": json.loads(call.function.arguments)["city"], "temperature": 21, "unit": "celsius"}
    followup = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)},
    ]
    final = chat(server, client, messages=followup, tools=TOOLS, max_tokens=40)
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason in ("stop", "length")


def test_tool_choice_required_makes_valid_calls_streamed_as_deltas_that_reassemble(server, client):
    required = dict(messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=80)
    answer = chat(server, client, **required)
    assert answer.choices[0].finish_reason == "tool_calls"
    (call,) = answer.choices[0].message.tool_calls  # parallel_tool_calls=false: exactly one
    assert_valid_call(call.function.name, call.function.arguments)
    calls, content, finish = streamed_tool_calls(chat(server, client, **required, stream=True))
    assert finish == "tool_calls" and content == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [(call.function.name, json.loads(call.function.arguments))]


def test_tool_choice_auto_answers_with_content_or_valid_calls_and_none_hides_the_tools(server, client):
    auto = chat(server, client, messages=ASK, tools=TOOLS, max_tokens=60)
    message = auto.choices[0].message
    for call in message.tool_calls or ():
        assert_valid_call(call.function.name, call.function.arguments)
    assert message.content or message.tool_calls
    assert (auto.choices[0].finish_reason == "tool_calls") == bool(message.tool_calls)
    none = chat(server, client, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=24)
    plain = chat(server, client, messages=ASK, max_tokens=24)
    assert none.choices[0].message.content == plain.choices[0].message.content and not none.choices[0].message.tool_calls


# ---- OpenAI strictness -----------------------------------------------------------------------

NON_NEUTRAL = {
    "audio": {"voice": "alloy", "format": "wav"},
    "function_call": "auto",
    "functions": [{"name": "f", "parameters": {}}],
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"},
    "web_search_options": {},
    "reasoning_effort": "low",
    "verbosity": "low",
    "moderation": True,
    "store": True,
}


@pytest.mark.parametrize("field", sorted(NOT_SUPPORTED))
def test_an_openai_option_preft_does_not_implement_is_a_400_naming_it(server, field):
    body = {"model": server.state.model_name, "messages": ASK, "max_tokens": 1, field: NON_NEUTRAL[field]}
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text


@pytest.mark.parametrize(
    "extra, param",
    [({"stream_options": {"include_usage": True}}, "stream_options"), ({"top_logprobs": 2}, "top_logprobs")],
)
def test_stream_options_without_stream_and_top_logprobs_without_logprobs_are_400s(server, extra, param):
    body = {"model": server.state.model_name, "messages": ASK, "max_tokens": 1, **extra}
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_unknown_fields_are_accepted_and_logged_once_and_responses_carry_a_system_fingerprint(server, client, caplog):
    with caplog.at_level(logging.WARNING, logger="preft.server"):
        for _ in range(2):
            answer = chat(server, client, messages=ASK, max_tokens=1, extra_body={"some_new_field_1234": 1, "store": False})
    logged = [r for r in caplog.records if "some_new_field_1234" in r.getMessage()]
    assert len(logged) == 1 and not any("'store'" in r.getMessage() for r in caplog.records)
    assert answer.system_fingerprint
    completion = client.completions.create(model=server.state.model_name, prompt="Hi", max_tokens=1)
    assert completion.system_fingerprint == answer.system_fingerprint
    chunks = list(chat(server, client, messages=ASK, max_tokens=2, stream=True))
    assert all(c.system_fingerprint == answer.system_fingerprint for c in chunks)


def test_grammars_are_compiled_off_the_engine_thread(server, client, monkeypatch):
    guided = server.engine_loop.engine.guided
    compile_grammar, compiled_on = guided.compile, []

    def recording(spec):
        if json.dumps(spec, sort_keys=True) not in guided._cache:
            compiled_on.append(threading.current_thread().name)
        return compile_grammar(spec)

    monkeypatch.setattr(guided, "compile", recording)
    chat(server, client, messages=ASK, max_tokens=8, extra_body={"guided_regex": "[a-z]{1,6}[.]"})
    assert compiled_on and "preft-engine" not in compiled_on
