"""docs/compatibility.md cannot drift: its tables list exactly the OpenAI request fields (from the official
client's types), preft's request-model fields, and the ``preft serve`` / ``preft train`` flags (from the
parsers), and each status matches what the server does with the option."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params
from pydantic import ValidationError

from preft.server.options import NO_EFFECT, NOT_SUPPORTED, check_request
from preft.server.protocol import APIError, ChatCompletionRequest, CompletionRequest
from preft.server.structured import request_spec
from preft.server.tools import ToolPlan

DOC = Path(__file__).resolve().parents[1] / "docs" / "compatibility.md"
STATUSES = {"honoured", "differs", "not supported", "preft"}
OPENAI_CHAT = set(chat_create_params.CompletionCreateParamsBase.__annotations__) | {"stream"}
OPENAI_COMPLETIONS = set(completion_create_params.CompletionCreateParamsBase.__annotations__) | {"stream"}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
# a value that asks for the option (not its neutral value), with what it needs alongside
CHAT_SAMPLES = {
    "max_tokens": 4, "max_completion_tokens": 4, "n": 2, "temperature": 0.5, "top_p": 0.9, "seed": 1, "stop": ["x"],
    "stream": True, "stream_options": {"stream": True, "stream_options": {"include_usage": True}}, "logprobs": True,
    "top_logprobs": {"logprobs": True, "top_logprobs": 2}, "presence_penalty": 0.5, "frequency_penalty": 0.5,
    "logit_bias": {"5": 1.0}, "response_format": {"type": "json_object"}, "tools": [TOOL],
    "tool_choice": {"tools": [TOOL], "tool_choice": "required"}, "parallel_tool_calls": {"tools": [TOOL], "parallel_tool_calls": False},
    "user": "u", "metadata": {"k": "v"}, "service_tier": "auto", "safety_identifier": "s", "prompt_cache_key": "k",
    "prompt_cache_retention": "24h", "prompt_cache_options": {}, "store": True, "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"], "prediction": {"type": "content", "content": "x"}, "web_search_options": {},
    "reasoning_effort": "low", "verbosity": "low", "moderation": True, "function_call": "auto", "functions": [{"name": "f"}],
}  # fmt: skip
COMPLETION_SAMPLES = {
    "max_tokens": 4, "n": 2, "temperature": 0.5, "top_p": 0.9, "seed": 1, "stop": ["x"], "stream": True,
    "stream_options": {"stream": True, "stream_options": {"include_usage": True}}, "logprobs": 2, "presence_penalty": 0.5,
    "frequency_penalty": 0.5, "logit_bias": {"5": 1.0}, "best_of": 2, "user": "u", "echo": True, "suffix": "end",
}  # fmt: skip


def tables() -> dict[str, dict[str, str]]:
    """Section heading -> {option: status}; a row's first cell may name aliases joined by ' / '."""
    sections: dict[str, dict[str, str]] = {}
    heading = None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            heading = line[3:]
            sections[heading] = {}
        elif heading and line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            for option in cells[0].split(" / "):
                sections[heading][option.strip("`")] = cells[1]
    return sections


def section(prefix: str) -> dict[str, str]:
    (found,) = [rows for heading, rows in tables().items() if heading.startswith(prefix)]
    return found


def with_status(rows: dict[str, str], status: str) -> set[str]:
    return {option for option, s in rows.items() if s == status}


def test_every_status_is_one_of_the_four():
    for heading, rows in tables().items():
        assert set(rows.values()) <= STATUSES, heading


def test_the_request_tables_list_exactly_the_openai_fields_and_preft_extras():
    assert set(section("OpenAI `POST /v1/chat")) == OPENAI_CHAT
    assert set(section("OpenAI `POST /v1/completions")) == OPENAI_COMPLETIONS
    extras = (set(ChatCompletionRequest.model_fields) - OPENAI_CHAT) | (set(CompletionRequest.model_fields) - OPENAI_COMPLETIONS)
    assert set(section("vLLM request extras")) == extras


def _accepted(cls: type, body: dict) -> bool:
    """Whether the server takes ``body``: request validation, strictness, tools and structured outputs."""
    try:
        request = cls(**body)
        check_request(request)
        plan = (
            ToolPlan.from_request(request.tools, request.tool_choice, request.parallel_tool_calls) if cls is ChatCompletionRequest else None
        )
        request_spec(request, plan.spec() if plan else None)
    except (ValidationError, APIError):
        return False
    return True


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_statuses_match_what_the_server_does_with_each_option(route):
    if route == "chat":
        cls, rows, samples, base = (
            ChatCompletionRequest,
            section("OpenAI `POST /v1/chat"),
            CHAT_SAMPLES,
            {"messages": [{"role": "user", "content": "hi"}]},
        )
    else:
        cls, rows, samples, base = CompletionRequest, section("OpenAI `POST /v1/completions"), COMPLETION_SAMPLES, {"prompt": "hi"}
    base = {"model": "m", **base}
    for option, status in rows.items():
        if option in base:
            continue
        sample = samples[option]
        needs_company = isinstance(sample, dict) and option in sample  # e.g. top_logprobs with logprobs
        body = {**base, **(sample if needs_company else {option: sample})}
        assert _accepted(cls, body) == (status != "not supported"), (option, status)
    if route == "chat":
        assert with_status(rows, "not supported") == set(NOT_SUPPORTED)
        assert NO_EFFECT <= with_status(rows, "differs")


def _options(parser: argparse.ArgumentParser) -> set[str]:
    names = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS or "-h" in action.option_strings:
            continue
        names |= set(action.option_strings) or {action.metavar or action.dest}
    return names


def test_the_serve_table_lists_exactly_the_flags_of_preft_serve():
    from preft.server.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert set(section("`preft serve` flags")) == _options(parser)


def test_the_train_table_lists_exactly_the_flags_of_preft_train_sft_and_grpo():
    from preft.train.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    (trainers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    flags = set().union(*(_options(p) for p in trainers.choices.values()))
    assert set(section("`preft train sft` / `preft train grpo`")) == flags
    assert not any(re.search(r"\s", flag) for flag in flags)
