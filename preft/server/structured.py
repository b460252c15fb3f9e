"""A request's structured-output options -> the engine's grammar spec (``SamplingParams.structured``).

OpenAI's ``response_format`` (``text``, ``json_object``, ``json_schema``) and vLLM's extras
``structured_outputs`` and (older) ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` each become one spec of
``preft.engine.guided``; giving two is a 400, and so is a spec the grammar engine rejects (the error
names the field). Tool calls that must happen (``tool_choice`` ``required`` or a named function) get
their grammar from ``preft.server.tools``.
"""

from __future__ import annotations

import json
from typing import Any

from preft.engine.guided import check_spec
from preft.errors import PreftError
from preft.server.protocol import APIError

GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def response_format_spec(response_format: Any) -> dict | None:
    """OpenAI's ``response_format`` -> a spec, or None for ``{"type": "text"}`` (400 for anything else)."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json": None}
    if kind == "json_schema":
        wrapper = response_format.get("json_schema")
        schema = wrapper.get("schema") if isinstance(wrapper, dict) else None
        if not isinstance(schema, dict):
            raise APIError(400, "response_format json_schema needs 'json_schema': {'name': ..., 'schema': {...}}", param="response_format")
        return {"json": schema}
    raise APIError(
        400, f"response_format type {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'", param="response_format"
    )


def structured_outputs_spec(options: Any) -> dict | None:
    """vLLM's newer ``structured_outputs`` (``{"json" | "regex" | "choice" | "grammar": ..., "json_object": true}``) -> a spec."""
    if options is None:
        return None
    given = {k: v for k, v in options.items() if v is not None and v is not False} if isinstance(options, dict) else None
    if given == {"json_object": True}:
        return {"json": None}
    if not given or len(given) != 1 or next(iter(given)) not in GUIDED_FIELDS.values():
        raise APIError(
            400, "structured_outputs takes exactly one of 'json', 'regex', 'choice', 'grammar', 'json_object'", param="structured_outputs"
        )
    kind, value = next(iter(given.items()))
    if kind == "json" and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise APIError(400, f"structured_outputs.json is not valid JSON: {e}", param="structured_outputs") from None
    return {kind: value}


def request_spec(body: Any, tool_spec: dict | None = None) -> dict | None:
    """The one grammar spec a request asks for (or None), checked: a 400 names the field that is wrong."""
    given: list[tuple[str, dict]] = []
    spec = response_format_spec(getattr(body, "response_format", None))
    if spec is not None:
        given.append(("response_format", spec))
    for name, kind in GUIDED_FIELDS.items():
        value = getattr(body, name, None)
        if value is not None:
            if kind == "json" and isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as e:
                    raise APIError(400, f"guided_json is not valid JSON: {e}", param=name) from None
            given.append((name, {kind: value}))
    spec = structured_outputs_spec(getattr(body, "structured_outputs", None))
    if spec is not None:
        given.append(("structured_outputs", spec))
    if tool_spec is not None:
        given.append(("tool_choice", tool_spec))
    if len(given) > 1:
        names = [name for name, _ in given]
        raise APIError(400, f"give at most one structured-output option; got {', '.join(names)}", param=names[-1])
    if not given:
        return None
    param, spec = given[0]
    try:
        check_spec(spec, param)
    except PreftError as e:
        raise APIError(400, str(e), param=param) from None
    return spec
