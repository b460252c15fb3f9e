"""The OpenAI wire format: request bodies, their translation to ``SamplingParams``, and errors.

Field names and defaults follow the OpenAI API; vLLM's extra sampling fields (``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``) are accepted too, so clients
written for vLLM work unchanged. Knobs a request leaves out take the model's generation_config.json
defaults (``preft serve --generation-config``), as in vLLM.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from preft.errors import PreftError

GREEDY_BELOW = 1e-5  # a temperature below this samples greedily, as in vLLM (dividing logits by ~0 overflows)
# status -> OpenAI error ``type``
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error answered in the OpenAI schema: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "error"), "param": param, "code": code or str(status)}}


class ModelNotFound(APIError):
    def __init__(self, message: str):
        super().__init__(404, message, param="model", code="model_not_found")


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    # Unknown fields are kept (and logged once per name by ``preft.server.options``), as vLLM does.
    model_config = ConfigDict(extra="allow")

    model: str
    n: int = Field(1, ge=1)  # at most --max-n (preft.server.guard)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # vLLM uses -1 for "off"; preft uses 0
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # torch generators take 64-bit seeds
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, ge=0.01, le=100.0)  # vLLM extra; 1 = off; bounded so logits stay finite
    logit_bias: dict[str, float] | None = None  # token id (a string, as OpenAI sends it) -> bias in [-100, 100]
    min_p: float = Field(0.0, ge=0.0, le=1.0)  # vLLM extra; 0 = off
    min_tokens: int = Field(0, ge=0)  # vLLM extra: no EOS / stop token ids before this many tokens
    user: str | None = None
    return_token_ids: bool = False  # vLLM extra: token ids of prompt and completion in each choice
    # structured outputs (preft.server.structured): OpenAI's response_format, vLLM's guided_* extras
    response_format: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict | None = None  # vLLM's newer form: {"json" | "regex" | "choice" | "grammar": ..., "json_object": true}

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict | None) -> dict | None:
        for token, bias in (value or {}).items():
            if not token.strip().isdigit():
                raise ValueError(f'keys must be token ids such as "50256", got {token!r}')
            if not -100 <= bias <= 100:
                raise ValueError(f"biases must be in [-100, 100], got {bias} for token {token}")
        return value

    @field_validator("temperature")
    @classmethod
    def _tiny_temperature_is_greedy(cls, value: float) -> float:
        return 0.0 if value < GREEDY_BELOW else value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and (not value or any(isinstance(p, list) and not p for p in value)):
            raise ValueError("must be a non-empty string, list of strings, list of token ids or list of token-id lists")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo=true is not supported by preft")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("best_of > 1 is not supported by preft; use n")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("is not supported by preft")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: one string, strings, one token-id list, or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None
    tool_calls: list[dict] | None = None  # an assistant turn's calls (preft.server.tools)
    tool_call_id: str | None = None  # a tool result's call
    name: str | None = None

    def text(self) -> str:
        """Message content as text; list content keeps its ``{"type": "text"}`` parts."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise APIError(400, f"message content part of type {part.get('type')!r} is not supported; only 'text'", param="messages")
            text = part.get("text")
            if not isinstance(text, str):
                raise APIError(400, f"a text content part needs a string 'text', got {type(text).__name__}", param="messages")
            parts.append(text)
        return "".join(parts)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True  # vLLM extra
    continue_final_message: bool = False  # vLLM extra
    tools: list[dict] | None = None  # preft.server.tools
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None


class TokenizeRequest(BaseModel):
    """vLLM's ``/tokenize`` body: a ``prompt``, or chat ``messages`` rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = True  # for ``prompt``; a chat template holds its own special tokens

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "give exactly one of 'prompt' or 'messages'", param="prompt")


class DetokenizeRequest(BaseModel):
    """vLLM's ``/detokenize`` body."""

    model: str | None = None
    tokens: list[int]


class LoadAdapterRequest(BaseModel):
    """vLLM's ``/v1/load_lora_adapter`` body; ``reft_name``/``reft_path`` for the ReFT endpoint; ``policy`` is preft's."""

    lora_name: str | None = None
    lora_path: str | None = None
    reft_name: str | None = None
    reft_path: str | None = None
    policy: Literal["prefill", "all"] | None = None

    def name_and_path(self) -> tuple[str, str]:
        name, path = self.lora_name or self.reft_name, self.lora_path or self.reft_path
        if not name:
            raise APIError(400, "missing adapter name: give 'lora_name' (or 'reft_name')", param="lora_name")
        if not path:
            raise APIError(400, "missing adapter path: give 'lora_path' (or 'reft_path')", param="lora_path")
        return name, path


class UnloadAdapterRequest(BaseModel):
    """vLLM's ``/v1/unload_lora_adapter`` body plus ``if_in_use``.

    ``if_in_use``: ``"wait"`` (default) waits for the requests that use the adapter, refusing new
    ones; ``"abort"`` ends those requests with an error; ``"error"`` refuses the unload with 409.
    """

    lora_name: str | None = None
    reft_name: str | None = None
    lora_int_id: int | None = None  # accepted for vLLM compatibility, unused
    if_in_use: Literal["wait", "abort", "error"] = "wait"

    def name(self) -> str:
        name = self.lora_name or self.reft_name
        if not name:
            raise APIError(400, "missing adapter name: give 'lora_name' (or 'reft_name')", param="lora_name")
        return name


def sampling_params(request: SamplingFields, max_tokens: int, logprobs: int | None, defaults: dict | None = None):
    """The engine's ``SamplingParams`` for one OpenAI request; ``defaults`` (the model's generation_config
    sampling values, ``preft.engine.sampler.generation_defaults``) fill the knobs the request leaves out."""
    try:
        from preft.engine import SamplingParams
    except ImportError:  # an engine build that does not re-export it
        from preft.engine.sampler import SamplingParams

    def knob(name: str) -> Any:
        return getattr(request, name) if name in request.model_fields_set or name not in (defaults or {}) else defaults[name]

    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=knob("temperature"),
            top_p=knob("top_p"),
            top_k=max(knob("top_k"), 0),
            min_p=knob("min_p"),
            repetition_penalty=knob("repetition_penalty"),
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            logit_bias={int(token): bias for token, bias in (request.logit_bias or {}).items()},
            min_tokens=request.min_tokens,
            seed=request.seed,
            stop=request.stop_list(),
            stop_token_ids=list(request.stop_token_ids),
            ignore_eos=request.ignore_eos,
            n=request.n,
            logprobs=logprobs,
        )
    except PreftError as e:  # a check across fields (e.g. min_tokens > max_tokens)
        raise engine_error(e) from e


def engine_error(e: PreftError) -> APIError:
    """A 400 for an engine-side check of a request; ``param`` is the request field the message starts with
    (the engine's checks name the field first: ``"min_tokens must be ..."``, ``"logit_bias token ids ..."``)."""
    field = str(e).split(" ", 1)[0]
    known = field in CompletionRequest.model_fields or field in ChatCompletionRequest.model_fields
    return APIError(400, str(e), param=field if known else None)
