"""Tool calling: OpenAI ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` on top of the chat template.

The model is told about the tools by its chat template when the template renders ``tools``; otherwise
(SmolLM2's template ignores them) by a Hermes-style system prompt, the format Qwen2.5 and Hermes use:
calls are ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, results come back as
``<tool_response>...</tool_response>``. What is generated depends on ``tool_choice``:

- ``auto`` (the default with tools): free text; ``<tool_call>`` blocks naming a known tool are parsed
  out of it, the rest is ``content``;
- ``required``: the grammar engine constrains the output to a JSON array of calls
  ``[{"name": ..., "arguments": {...}}]`` whose arguments match each function's parameters schema
  (exactly one call when ``parallel_tool_calls`` is false), so every call is valid;
- a named function: the output is constrained to that function's arguments (its parameters schema);
- ``none``: the tools are not shown to the model and nothing is parsed.

``ToolCallStream`` turns the text deltas of one choice into OpenAI chat deltas (``content`` and
``tool_calls`` fragments, by index); the non-streamed response is the same machine run over the whole
text, so both paths agree. A choice that made calls finishes with ``tool_calls``.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from preft.server.protocol import APIError

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
HERMES_TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolPlan:
    """What a request's tools ask of generation (see module doc); built by ``from_request``."""

    tools: list[dict]  # OpenAI tool objects ({"type": "function", "function": {...}})
    choice: str  # "auto" | "required" | "named"
    name: str | None = None  # the function of a named tool_choice
    parallel: bool = True

    @classmethod
    def from_request(cls, tools: list | None, tool_choice: Any, parallel_tool_calls: bool | None) -> ToolPlan | None:
        """None when the request has no tools or ``tool_choice`` is ``"none"``; a 400 naming the field for bad input."""
        if not tools:
            if tool_choice not in (None, "none"):
                raise APIError(400, "tool_choice needs 'tools': give the functions the model may call", param="tool_choice")
            return None
        names = [_check_tool(i, tool) for i, tool in enumerate(tools)]
        if len(set(names)) != len(names):
            raise APIError(400, f"tool names must be unique, got {names}", param="tools")
        parallel = parallel_tool_calls is not False
        if tool_choice in (None, "auto"):
            return cls(list(tools), "auto", parallel=parallel)
        if tool_choice == "none":
            return None
        if tool_choice == "required":
            return cls(list(tools), "required", parallel=parallel)
        if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
            name = (tool_choice.get("function") or {}).get("name")
            if name not in names:
                raise APIError(400, f"tool_choice names function {name!r}, which is not in tools {names}", param="tool_choice")
            return cls(list(tools), "named", name=name, parallel=parallel)
        raise APIError(
            400,
            f"tool_choice must be 'none', 'auto', 'required' or {{'type': 'function', 'function': {{'name': ...}}}}, got {tool_choice!r}",
            param="tool_choice",
        )

    def functions(self) -> dict[str, dict]:
        return {t["function"]["name"]: t["function"] for t in self.tools}

    def spec(self) -> dict | None:
        """The grammar spec (``preft.engine.guided``) that makes the calls valid, or None for ``auto``."""
        functions = self.functions()
        if self.choice == "named":
            return {"json": functions[self.name].get("parameters") or EMPTY_PARAMETERS}
        if self.choice == "required":
            calls = [
                {
                    "type": "object",
                    "properties": {"name": {"const": name}, "arguments": f.get("parameters") or EMPTY_PARAMETERS},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
                for name, f in functions.items()
            ]
            array = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1}
            return {"json": array if self.parallel else {**array, "maxItems": 1}}
        return None

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self)

    def parse(self, text: str, finish_reason: str | None) -> tuple[str | None, list[dict], str | None]:
        """A whole output -> (content or None, tool_calls, finish_reason): the streamed deltas, assembled."""
        stream = self.stream()
        deltas = stream.feed(text) + stream.finish()
        content = "".join(d.get("content", "") for d in deltas)
        calls: dict[int, dict] = {}
        for delta in deltas:
            for part in delta.get("tool_calls", ()):
                call = calls.setdefault(
                    part["index"], {"id": part.get("id"), "type": "function", "function": {"name": "", "arguments": ""}}
                )
                call["function"]["name"] += part.get("function", {}).get("name", "")
                call["function"]["arguments"] += part.get("function", {}).get("arguments", "")
        return content if content.strip() else None, [calls[i] for i in sorted(calls)], stream.finish_reason(finish_reason)


def tool_call_choice(choice: dict, plan: ToolPlan) -> dict:
    """A non-streamed chat choice with its text parsed into ``content`` and ``tool_calls`` (finish ``tool_calls``)."""
    content, calls, finish = plan.parse(choice["message"]["content"] or "", choice["finish_reason"])
    message = {**choice["message"], "content": content, **({"tool_calls": calls} if calls else {})}
    return {**choice, "message": message, "finish_reason": finish}


def _check_tool(index: int, tool: Any) -> str:
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
        raise APIError(
            400, f"tools[{index}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': {{...}}}}}}", param="tools"
        )
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise APIError(400, f"tools[{index}].function.name must be a non-empty string", param="tools")
    if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
        raise APIError(400, f"tools[{index}].function.parameters must be a JSON schema object", param="tools")
    return name


class ToolCallStream:
    """One choice's text deltas -> OpenAI chat deltas (``{"content": ...}`` / ``{"tool_calls": [...]}``)."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.pending = ""  # text not turned into deltas yet
        self.inside = False  # auto: between <tool_call> and </tool_call>
        self.num_calls = 0

    @property
    def called(self) -> bool:
        return self.num_calls > 0

    def finish_reason(self, engine_reason: str | None) -> str | None:
        """``tool_calls`` for a choice that ended normally after making calls, else the engine's reason."""
        return "tool_calls" if self.called and engine_reason == "stop" else engine_reason

    def rewrite(self, chunks: list[dict]) -> list[dict]:
        """The server's chat chunks of this choice (``{"choices": [{"delta": {"content": ...}, ...}]}``) with their
        text turned into content and tool-call deltas; the role chunk passes unchanged, held-back text waits."""
        out = []
        for chunk in chunks:
            (choice,) = chunk["choices"]
            if "role" in choice["delta"]:
                out.append(chunk)
                continue
            deltas, finish = self.step(choice["delta"].get("content", ""), choice["finish_reason"])
            if not deltas and finish is None:
                continue
            for i, delta in enumerate(deltas or [{}]):
                last = i == max(len(deltas), 1) - 1
                part = {**choice, "delta": delta, "finish_reason": finish if last else None}
                if i:
                    part = {**part, "logprobs": None, **({"token_ids": []} if "token_ids" in part else {})}
                out.append({**chunk, "choices": [part]})
        return out

    def step(self, text: str, finish_reason: str | None) -> tuple[list[dict], str | None]:
        """One streamed step of the choice: its new text (and its finish, if it ended) -> deltas and finish."""
        deltas = self.feed(text) + (self.finish() if finish_reason is not None else [])
        return deltas, self.finish_reason(finish_reason)

    def feed(self, text: str) -> list[dict]:
        if self.plan.choice == "named":
            deltas = []
            if not self.called:
                self.num_calls = 1
                first = {"index": 0, "id": _call_id(), "type": "function", "function": {"name": self.plan.name, "arguments": ""}}
                deltas.append({"tool_calls": [first]})
            if text:
                deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
            return deltas
        self.pending += text
        return self._auto(final=False) if self.plan.choice == "auto" else []

    def finish(self) -> list[dict]:
        """Deltas for whatever is still held back, at the end of the choice."""
        if self.plan.choice == "named":
            return [] if self.called else self.feed("")
        if self.plan.choice == "auto":
            return self._auto(final=True)
        text, self.pending = self.pending, ""
        try:
            calls = json.loads(text)
        except json.JSONDecodeError:  # cut short (finish "length"): the text as it is
            return [{"content": text}] if text else []
        return [self._call(call.get("name", ""), call.get("arguments", {})) for call in calls]

    def _call(self, name: str, arguments: Any) -> dict:
        index, self.num_calls = self.num_calls, self.num_calls + 1
        args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        return {"tool_calls": [{"index": index, "id": _call_id(), "type": "function", "function": {"name": name, "arguments": args}}]}

    def _parse_block(self, block: str) -> dict | None:
        """A ``<tool_call>`` body -> its call delta, or None when it is not a call of a known tool."""
        if self.called and not self.plan.parallel:
            return None
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict) or call.get("name") not in self.plan.functions():
            return None
        arguments = call.get("arguments", call.get("parameters", {}))
        return self._call(call["name"], arguments) if isinstance(arguments, dict | str) else None

    def _auto(self, final: bool) -> list[dict]:
        deltas: list[dict] = []

        def content(text: str) -> None:
            if text and not (self.called and not text.strip()):  # no whitespace-only content around calls
                deltas.append({"content": text})

        while self.pending:
            if not self.inside:
                at = self.pending.find(TOOL_CALL_START)
                if at < 0:
                    keep = 0 if final else _partial_suffix(self.pending, TOOL_CALL_START)
                    content(self.pending[: len(self.pending) - keep])
                    self.pending = self.pending[len(self.pending) - keep :]
                    break
                content(self.pending[:at])
                self.pending, self.inside = self.pending[at + len(TOOL_CALL_START) :], True
                continue
            end = self.pending.find(TOOL_CALL_END)
            if end < 0 and not final:
                break
            block = self.pending if end < 0 else self.pending[:end]  # at the end an unclosed block still counts
            call = self._parse_block(block.strip())
            if call is not None:
                deltas.append(call)
            else:
                content(TOOL_CALL_START + block + ("" if end < 0 else TOOL_CALL_END))
            self.pending = "" if end < 0 else self.pending[end + len(TOOL_CALL_END) :]
            self.inside = False
        return deltas


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a beginning of ``tag`` (it may still become the tag)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def template_messages(messages: list[Any], chat_template: str | None, plan: ToolPlan | None) -> tuple[list[dict], dict]:
    """Chat messages (``protocol.ChatMessage``) -> the template's messages and extra keyword arguments.

    A template that renders ``tools`` gets them (and assistant ``tool_calls`` / ``tool`` messages) as
    transformers expects; any other template gets the Hermes format written into the messages.
    """
    native = "tools" in (chat_template or "")
    rendered: list[dict] = []
    for m in messages:
        message: dict[str, Any] = {"role": m.role, "content": m.text()}
        calls = getattr(m, "tool_calls", None) or []
        if native:
            if calls:
                message["tool_calls"] = [_native_call(c) for c in calls]
            for key in ("tool_call_id", "name"):
                if getattr(m, key, None) is not None:
                    message[key] = getattr(m, key)
        else:
            if calls:
                blocks = [
                    f"{TOOL_CALL_START}\n{json.dumps(_native_call(c)['function'], ensure_ascii=False)}\n{TOOL_CALL_END}" for c in calls
                ]
                message["content"] = "\n".join(filter(None, [message["content"], *blocks]))
            if m.role == "tool":
                message = {"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
        rendered.append(message)
    if plan is None:
        return rendered, {}
    if native:
        return rendered, {"tools": plan.tools}
    prompt = HERMES_TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in plan.tools))
    if rendered and rendered[0]["role"] == "system":
        rendered[0] = {**rendered[0], "content": rendered[0]["content"] + "\n\n" + prompt}
    else:
        rendered.insert(0, {"role": "system", "content": prompt})
    return rendered, {}


def _native_call(call: Any) -> dict:
    """An OpenAI tool call as transformers chat templates take it (arguments as a dict where they parse)."""
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    return {"type": "function", "function": {"name": function.get("name", ""), "arguments": function.get("arguments", {})}}
