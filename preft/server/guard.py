"""The request guard: limits on every input enforced before any work, and every client error a 4xx.

``RequestGuard`` is an ASGI middleware in front of every route. For each POST it

- reads the body up to ``--max-request-body-bytes`` (413 beyond, before anything is parsed);
- refuses lone UTF-16 surrogates anywhere in the JSON (400: no tokenizer or JSON encoder can take them);
- checks the counts a request asks for against the limits (``n``, prompts, choices = prompts x n,
  stop strings and their length) and a prompt whose text alone cannot fit the context (400, before
  tokenising: every token covers at most ``max_piece_chars`` characters);
- checks adapter names and paths of load requests (printable, bounded, no NUL);

and turns an unexpected exception into a JSON 500 that names no internals, answered on the same
connection (an exception that reaches uvicorn drops the keep-alive connection).
``docs/server.md`` ("Limits and errors") lists every limit with its flag and status.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from typing import Any

from preft.server.limits import ServerLimits
from preft.server.protocol import APIError, error_body

logger = logging.getLogger("preft.server")

GENERATE_ROUTES = ("/v1/completions", "/v1/chat/completions")
LOAD_ROUTES = ("/v1/load_lora_adapter", "/v1/load_reft_adapter")
ADAPTER_NAME = re.compile(r"[^\s\x00-\x1f\x7f]{1,128}")  # printable, no whitespace, at most 128 characters
# A normaliser may merge characters (NFKC), so a token may stand for a few more input characters than its piece has.
NORMALISER_SLACK = 4
DEFAULT_LIMITS = ServerLimits()


def max_piece_chars(tokenizer: Any) -> int:
    """The most characters one token of ``tokenizer`` can stand for (its longest vocabulary piece)."""
    try:
        return max(1, max(len(piece) for piece in tokenizer.get_vocab()))
    except Exception:  # a tokenizer without a vocabulary listing: no pre-check
        return 1 << 30


def lone_surrogate(value: Any, path: str = "") -> str | None:
    """The JSON path of the first string holding a lone UTF-16 surrogate, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and lone_surrogate(key, path) is not None:
            return path or "body"
        found = lone_surrogate(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


class RequestTooLarge(APIError):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit} bytes (--max-request-body-bytes)", code="request_too_large")


class RequestGuard:
    """The ASGI middleware described in the module doc. ``state`` is the server's ``ServerState``."""

    def __init__(self, app: Any, state: Any):
        self.app, self.state = app, state
        self.piece_chars = max_piece_chars(state.tokenizer) * NORMALISER_SLACK

    @property
    def limits(self) -> ServerLimits:
        return getattr(self.state, "limits", None) or DEFAULT_LIMITS

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            if scope["method"] == "POST":
                body = await self.read_body(scope, receive)
                self.check(scope["path"], body)
                receive = _replay(body, receive)
            await self.app(scope, receive, send_tracked)
        except APIError as e:
            if started:
                raise
            await _send_json(send, e.status, e.body())
        except Exception:
            if started:
                raise
            error_id = uuid.uuid4().hex[:12]
            logger.exception("unhandled error %s in %s %s", error_id, scope["method"], scope["path"])
            await _send_json(send, 500, error_body(500, f"internal error {error_id}; the server log has its details"))

    async def read_body(self, scope: dict, receive: Any) -> bytes:
        limit = self.limits.max_request_body_bytes
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestTooLarge(limit)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RequestTooLarge(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def check(self, path: str, body: bytes) -> None:
        """400 for what the limits refuse; a body that is not JSON is left to the route's own validation."""
        try:
            data = json.loads(body) if body else None
        except (ValueError, RecursionError):
            return
        try:
            where = lone_surrogate(data)
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply") from None
        if where is not None:
            raise APIError(400, f"'{where}' holds a lone UTF-16 surrogate, which is not text; send valid Unicode", param=where)
        if not isinstance(data, dict):
            return
        if path in GENERATE_ROUTES:
            self.check_generate(data, chat=path.endswith("chat/completions"))
        elif path in LOAD_ROUTES:
            check_load(data)

    def check_generate(self, data: dict, chat: bool) -> None:
        limits = self.limits
        for name in ("n", "best_of"):
            value = data.get(name)
            if _is_int(value) and value > limits.max_n:
                raise APIError(400, f"'{name}' is {value}; this server allows at most {limits.max_n} (--max-n)", param=name)
        prompt = data.get("prompt")
        texts: list[str] = []
        num_prompts = 1
        if isinstance(prompt, str):
            texts = [prompt]
        elif isinstance(prompt, list) and prompt and not all(_is_int(p) for p in prompt):
            num_prompts = len(prompt)
            texts = [p for p in prompt if isinstance(p, str)]
        if num_prompts > limits.max_prompts_per_request:
            raise APIError(
                400,
                f"{num_prompts} prompts in one request; this server allows at most {limits.max_prompts_per_request} "
                "(--max-prompts-per-request)",
                param="prompt",
            )
        n = data.get("n") if _is_int(data.get("n")) else 1
        if num_prompts * n > limits.max_choices_per_request:
            raise APIError(
                400,
                f"{num_prompts} prompt(s) x n={n} = {num_prompts * n} choices; this server allows at most "
                f"{limits.max_choices_per_request} per request (--max-choices-per-request)",
                param="n",
            )
        stop = data.get("stop")
        stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
        if len(stops) > limits.max_stop_sequences:
            raise APIError(400, f"{len(stops)} stop strings; at most {limits.max_stop_sequences} (--max-stop-sequences)", param="stop")
        for s in stops:
            if isinstance(s, str) and len(s) > limits.max_stop_length:
                raise APIError(
                    400, f"a stop string of {len(s)} characters; at most {limits.max_stop_length} (--max-stop-length)", param="stop"
                )
        stop_ids = data.get("stop_token_ids")
        if isinstance(stop_ids, list) and len(stop_ids) > limits.max_stop_sequences:
            raise APIError(
                400, f"{len(stop_ids)} stop_token_ids; at most {limits.max_stop_sequences} (--max-stop-sequences)", param="stop_token_ids"
            )
        if chat:
            texts = [_message_text(m) for m in data.get("messages") or () if isinstance(m, dict)]
            texts = ["".join(texts)]
        context = self.state.max_model_len
        for text in texts:
            at_least = len(text) // self.piece_chars
            if at_least > context:
                raise APIError(
                    400,
                    f"the prompt has at least {at_least} tokens ({len(text)} characters), but this model's context holds {context}",
                    param="messages" if chat else "prompt",
                    code="context_length_exceeded",
                )


def check_load(data: dict) -> None:
    """Adapter names are printable and bounded; paths hold no NUL."""
    for key in ("lora_name", "reft_name"):
        name = data.get(key)
        if isinstance(name, str) and not ADAPTER_NAME.fullmatch(name):
            raise APIError(400, f"'{key}' must be 1 to 128 printable characters without spaces", param=key)
    for key in ("lora_path", "reft_path"):
        path = data.get(key)
        if isinstance(path, str) and "\x00" in path:
            raise APIError(400, f"'{key}' holds a NUL character", param=key)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _message_text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that hands the already-read body to the app once, then waits on the real one (disconnects)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> dict:
        return pending.pop() if pending else await receive()

    return replay


async def _send_json(send: Any, status: int, payload: dict) -> None:
    data = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
