"""The FastAPI application: OpenAI-compatible routes on top of an ``EngineLoop``.

One request, end to end: the handler validates the body (``protocol``), turns ``model`` into an
adapter name (or ``None`` for the base model), tokenizes chat messages with the tokenizer's chat
template, submits one engine request per prompt, and reads the engine's token-id deltas from its
asyncio queue, turns them into text here (``Choices``: off the engine thread), either streaming them as server-sent events or collecting them into one response. A client
that goes away aborts its engine requests, which frees their KV blocks and adapter slots.
"""

from __future__ import annotations

import asyncio
import codecs
import dataclasses
import functools
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import preft
from preft.engine.detokenizer import Detokenizer
from preft.errors import PreftError
from preft.server.engine_loop import EngineLoop, RequestFailed
from preft.server.guard import RequestGuard
from preft.server.limits import ServerLimits
from preft.server.options import check_request
from preft.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadAdapterRequest,
    ModelNotFound,
    TokenizeRequest,
    UnloadAdapterRequest,
    engine_error,
    error_body,
    sampling_params,
)
from preft.server.structured import request_spec
from preft.server.tools import ToolPlan, template_messages, tool_call_choice

logger = logging.getLogger("preft.server")
SYSTEM_FINGERPRINT = f"fp_preft_{preft.__version__}"  # OpenAI's field: changes when the serving stack does


@dataclass
class ServerState:
    """What the routes need: the engine loop and facts about the served model."""

    engine_loop: EngineLoop
    tokenizer: Any
    model_name: str
    max_model_len: int
    model_dir: str | None = None
    api_key: str | None = None
    adapter_root: Path | None = None
    created: int = 0
    max_lora_rank: int | None = None  # --max-lora-rank: runtime loads above it are refused
    limits: ServerLimits | None = None  # --max-n, --max-request-body-bytes, ... (preft.server.limits); None: the defaults
    protected_adapters: frozenset[str] = frozenset()  # --protect-startup-adapters: never unloaded through the API
    sampling_defaults: dict = field(default_factory=dict)  # --generation-config: knobs a request leaves out

    def adapter_for(self, model: str) -> str | None:
        """``None`` for the base model, else the adapter name (checked again on the engine thread)."""
        if model == self.model_name:  # its model id only: the model's host path is no name
            return None
        if model not in self.engine_loop.adapters():
            raise ModelNotFound(
                f"the model {model!r} does not exist; choose the base model {self.model_name!r} or a loaded adapter (GET /v1/models)"
            )
        return model

    def resolve_adapter_path(self, path: str) -> str:
        """The real path of an adapter to load; 403 unless it lies inside ``--adapter-root``."""
        if self.adapter_root is None:
            raise APIError(
                403,
                "loading adapters at runtime is disabled; start the server with --adapter-root DIR",
                param="lora_path",
                code="forbidden",
            )
        from preft.adapters.io import CONFIG_NAME, PEFT_BIN_NAME, WEIGHTS_NAME

        root = self.adapter_root.resolve()
        try:
            candidate = Path(path).expanduser()
            resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
            # Symlinks resolved for the folder and for each file read: a link inside the root may point anywhere.
            files = [(resolved / name).resolve() for name in (CONFIG_NAME, WEIGHTS_NAME, PEFT_BIN_NAME) if (resolved / name).exists()]
        except (OSError, RuntimeError) as e:  # a name too long, a symlink loop
            reason = getattr(e, "strerror", None) or type(e).__name__
            raise APIError(400, f"the adapter path cannot be resolved: {reason}", param="lora_path") from None
        if not all(p.is_relative_to(root) for p in [resolved, *files]):
            raise APIError(403, "the adapter path leads outside --adapter-root", param="lora_path", code="forbidden")
        return str(resolved)

    def shown_path(self, path: str | None) -> str | None:
        """An adapter's path as clients see it: relative to --adapter-root; None for others (never a host path)."""
        if path is None or self.adapter_root is None:
            return None
        try:
            return str(Path(path).relative_to(self.adapter_root.resolve()))
        except ValueError:
            return None


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character for each byte (GPT-2's table), as character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


BYTE_OF_CHAR = _byte_level_alphabet()


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ClientGone(Exception):
    """The HTTP client disconnected before its response was ready."""


class ChoiceText:
    """One choice as the client sees it: the detokenised text of the engine's deltas, what was streamed so far."""

    def __init__(self, tokenizer, stop: list[str]):
        self.detok = Detokenizer(tokenizer, stop)
        self.logprobs: list[dict[int, float]] | None = None
        self.finish_reason: str | None = None
        self.sent_text = 0  # characters already streamed
        self.sent_tokens = 0  # tokens already streamed
        self.sent_finish = False

    @property
    def text(self) -> str:
        return self.detok.text

    @property
    def token_ids(self) -> list[int]:
        return self.detok.token_ids


class Choices:
    """Text and token bookkeeping for every choice of one HTTP request (prompts x n), fed with the engine's deltas.

    Detokenisation and stop strings run here, in the request's asyncio task, not on the engine thread. A stop
    string ends its choice at once (``stop_sequence`` tells the engine); tokens the engine sampled after the
    one that completed it are neither shown nor counted in ``usage``.
    """

    def __init__(self, request_ids: list[str], n: int, tokenizer, stop: list[str] | None = None, stop_sequence: Any = None):
        self.request_ids, self.n = request_ids, n
        self.position = {rid: i for i, rid in enumerate(request_ids)}
        self.state = [ChoiceText(tokenizer, stop or []) for _ in range(len(request_ids) * n)]
        self.prompt_tokens: dict[str, list[int]] = {}
        self.stop_sequence = stop_sequence  # (request_id, completion index) -> None

    def choice_index(self, request_id: str, completion_index: int) -> int:
        return self.position[request_id] * self.n + completion_index

    def apply(self, update: Any) -> list[int]:
        """Take one step's deltas of one request; the indexes of the choices that changed."""
        self.prompt_tokens[update.request_id] = update.prompt_token_ids
        changed = []
        for delta in update.outputs:
            index = self.choice_index(update.request_id, delta.index)
            choice = self.state[index]
            if choice.finish_reason is not None:
                continue  # stopped here already: what the engine sampled since is dropped
            stopped = choice.detok.add(delta.new_token_ids, finished=delta.finish_reason is not None)
            if delta.new_logprobs is not None:
                choice.logprobs = (choice.logprobs or []) + list(delta.new_logprobs)
                del choice.logprobs[choice.detok.num_tokens :]
            if stopped:
                choice.finish_reason = "stop"
                if delta.finish_reason is None and self.stop_sequence is not None:
                    self.stop_sequence(update.request_id, delta.index)
            else:
                choice.finish_reason = delta.finish_reason
            changed.append(index)
        return changed

    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.state)

    def unfinished(self) -> list[str]:
        return [rid for rid in self.request_ids if any(c.finish_reason is None for c in self.choices_of(rid))]

    def choices_of(self, request_id: str) -> list[ChoiceText]:
        start = self.position[request_id] * self.n
        return self.state[start : start + self.n]

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompt_tokens.values())
        completion = sum(c.detok.num_tokens for c in self.state)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def new_text(self, index: int, completion: Any = None) -> tuple[str, list[int], Any, int] | None:
        """Text, tokens and logprobs of choice ``index`` not streamed yet, and where that text starts.

        ``None`` while there is nothing to send: no new text (a partial UTF-8 character or the start of a
        possible stop string is held back) and no finish. Tokens without text wait for the chunk that
        carries their text, so only the final chunk (the finish) can be empty. A finished choice yields
        its finish once.
        """
        choice = self.state[index]
        if choice.sent_finish:
            return None
        finished = choice.finish_reason is not None
        text = choice.detok.visible_text(finished)
        start, start_tok = choice.sent_text, choice.sent_tokens
        if len(text) <= start and not finished:
            return None
        choice.sent_text = max(start, len(text))
        choice.sent_tokens = choice.detok.num_tokens
        choice.sent_finish = finished
        logprobs = choice.logprobs[start_tok : choice.sent_tokens] if choice.logprobs is not None else None
        return text[start:], choice.token_ids[start_tok : choice.sent_tokens], logprobs, start


def _finish_reason(reason: str | None) -> str | None:
    return None if reason is None else "length" if reason == "length" else "stop"


class Routes:
    def __init__(self, state: ServerState):
        self.state = state
        self.loop = state.engine_loop
        self.tokenizer = state.tokenizer
        self.special_ids = set(getattr(state.tokenizer, "all_special_ids", ()))
        self.tokenizer_pool = ThreadPoolExecutor(1, thread_name_prefix="preft-tokenize")  # one thread, as vLLM's

    # ---- shared request machinery ------------------------------------------------------------

    async def submit_all(
        self, prefix: str, prompts: list[str | list[int]], params: Any, adapter: str | None
    ) -> tuple[list[str], asyncio.Queue]:
        sink: asyncio.Queue = asyncio.Queue()
        request_ids = [f"{prefix}-{i}" for i in range(len(prompts))]
        try:
            for request_id, prompt in zip(request_ids, prompts):
                await self.loop.submit(request_id, prompt, params, adapter, sink)
        except BaseException:
            for request_id in request_ids:
                self.loop.abort(request_id)
            raise
        return request_ids, sink

    async def collect(self, request: Request, sink: asyncio.Queue, choices: Choices) -> None:
        """Wait until every request finished; abort them all if the client disconnects first."""
        disconnect = asyncio.create_task(_wait_for_disconnect(request))
        try:
            while not choices.finished():
                get = asyncio.create_task(sink.get())
                done, _ = await asyncio.wait({get, disconnect}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    raise ClientGone()
                item = get.result()
                if isinstance(item, RequestFailed):
                    raise item.error
                choices.apply(item)
        finally:
            disconnect.cancel()
            for request_id in choices.unfinished():
                self.loop.abort(request_id)

    async def stream(
        self, sink: asyncio.Queue, choices: Choices, chunks: Any, include_usage: bool, chunk_header: dict
    ) -> AsyncIterator[str]:
        """Server-sent events: one chunk per choice per step, then usage (if asked), then ``[DONE]``.

        If the client disconnects, Starlette cancels this generator and ``finally`` aborts the requests.
        """
        try:
            while not choices.finished():
                item = await sink.get()
                if isinstance(item, RequestFailed):
                    yield sse(item.error.body())
                    break
                for index in choices.apply(item):
                    for chunk in chunks(index, choices.state[index], choices):
                        yield sse({**chunk_header, **chunk})
            if include_usage:
                yield sse({**chunk_header, "choices": [], "usage": choices.usage()})
            yield sse("[DONE]")
        finally:
            for request_id in choices.unfinished():
                self.loop.abort(request_id)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for; a piece of a multi-byte character (alone it decodes to U+FFFD) gives its raw bytes."""
        text = self.token_text(token_id)
        if "\ufffd" not in text:
            return text.encode("utf-8")
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):  # SentencePiece byte fallback
            return bytes([int(piece[3:5], 16)])
        if all(ch in BYTE_OF_CHAR for ch in piece):  # byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM)
            return bytes(BYTE_OF_CHAR[ch] for ch in piece)
        return text.encode("utf-8")

    async def in_tokenizer_thread(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on the tokenizer thread: a long prompt never stalls the event loop (every stream)."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool, functools.partial(fn, *args, **kwargs))

    def check_length(self, prompt_len: int, max_tokens: int | None, field: str) -> int:
        limit = self.state.max_model_len
        if prompt_len >= limit:
            raise APIError(
                400,
                f"the prompt has {prompt_len} tokens, but this model's context holds {limit}; shorten the prompt",
                param=field,
                code="context_length_exceeded",
            )
        if max_tokens is None:
            return limit - prompt_len
        if prompt_len + max_tokens > limit:
            raise APIError(
                400,
                f"this model's context holds {limit} tokens, but {prompt_len} prompt tokens + max_tokens {max_tokens} exceed it; lower max_tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return max_tokens

    # ---- /v1/completions ---------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        check_request(body)
        adapter = self.state.adapter_for(body.model)
        # Token ids from here on: the engine thread never tokenises, nor does the event loop.
        prompts = [p if isinstance(p, list) else await self.in_tokenizer_thread(self.tokenizer.encode, p) for p in body.prompts()]
        max_tokens = [self.check_length(len(prompt), body.max_tokens, "prompt") for prompt in prompts]
        params = sampling_params(body, min(max_tokens), body.logprobs, self.state.sampling_defaults)
        spec = request_spec(body)
        if spec is not None:
            params = dataclasses.replace(params, structured=spec)
            await self.in_tokenizer_thread(self.loop.engine.guided.compile, spec)  # not on the engine thread
        request_id = f"cmpl-{uuid.uuid4().hex}"
        request_ids, sink = await self.submit_all(request_id, prompts, params, adapter)
        choices = Choices(request_ids, body.n, self.tokenizer, params.stop, self.loop.stop_sequence)
        header = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": body.model}
        header["system_fingerprint"] = SYSTEM_FINGERPRINT

        if body.stream:

            def chunks(index: int, completion: Any, choices: Choices) -> list[dict]:
                new = choices.new_text(index, completion)
                if new is None:
                    return []
                text, tokens, logprobs, offset = new
                lp = self.completion_logprobs(tokens, logprobs, offset) if logprobs is not None else None
                choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": _finish_reason(completion.finish_reason)}
                if body.return_token_ids:
                    choice["token_ids"] = list(tokens)
                return [{"choices": [choice]}]

            return StreamingResponse(self.stream(sink, choices, chunks, body.include_usage(), header), media_type="text/event-stream")

        await self.collect(request, sink, choices)
        out = []
        for rid in request_ids:
            for k, c in enumerate(choices.choices_of(rid)):
                lp = self.completion_logprobs(c.token_ids, c.logprobs) if c.logprobs is not None else None
                choice = {
                    "index": choices.choice_index(rid, k),
                    "text": c.text,
                    "logprobs": lp,
                    "finish_reason": _finish_reason(c.finish_reason),
                }
                if body.return_token_ids:
                    choice.update(token_ids=list(c.token_ids), prompt_token_ids=list(choices.prompt_tokens[rid]))
                out.append(choice)
        return {**header, "choices": sorted(out, key=lambda c: c["index"]), "usage": choices.usage()}

    def completion_logprobs(self, tokens: tuple[int, ...], logprobs: tuple[dict[int, float], ...], offset: int = 0) -> dict:
        """OpenAI completion logprobs; ``text_offset`` is each token's character offset in the choice's text
        (``offset``: where ``tokens``' text starts), the start of its character for a piece of one."""
        texts = [self.token_text(t) for t in tokens]
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        offsets, at = [], offset
        for t in tokens:
            offsets.append(at)
            if t not in self.special_ids:  # special tokens are not in the text
                at += len(utf8.decode(self.token_bytes(t)))
        return {
            "tokens": texts,
            "token_logprobs": [lp.get(t) for t, lp in zip(tokens, logprobs)],
            "top_logprobs": [{self.token_text(k): v for k, v in lp.items()} for lp in logprobs],
            "text_offset": offsets,
        }

    # ---- /v1/chat/completions ----------------------------------------------------------------

    def chat_prompt(self, body: ChatCompletionRequest, plan: ToolPlan | None = None) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, f"the model {self.state.model_name!r} has no chat template; use /v1/completions", param="messages")
        messages, tools = template_messages(body.messages, self.tokenizer.chat_template, plan)
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=body.add_generation_prompt and not body.continue_final_message,
                continue_final_message=body.continue_final_message,
                **tools,
            )
        except Exception as e:  # a template may raise on roles or orders it does not accept
            raise APIError(400, f"the chat template rejected these messages: {e}", param="messages") from None
        # The template already holds any BOS it wants; adding special tokens again would double it.
        return self.tokenizer.encode(text, add_special_tokens=False)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Any:
        check_request(body)
        plan = ToolPlan.from_request(body.tools, body.tool_choice, body.parallel_tool_calls)
        spec = request_spec(body, plan.spec() if plan is not None else None)
        adapter = self.state.adapter_for(body.model)
        prompt = await self.in_tokenizer_thread(self.chat_prompt, body, plan)
        max_tokens = self.check_length(len(prompt), body.max_completion_tokens or body.max_tokens, "messages")
        top = body.top_logprobs or 0
        params = sampling_params(body, max_tokens, top if body.logprobs else None, self.state.sampling_defaults)
        if spec is not None:
            params = dataclasses.replace(params, structured=spec)
            await self.in_tokenizer_thread(self.loop.engine.guided.compile, spec)  # not on the engine thread
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        request_ids, sink = await self.submit_all(request_id, [prompt], params, adapter)
        choices = Choices(request_ids, body.n, self.tokenizer, params.stop, self.loop.stop_sequence)
        header = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": body.model}
        header["system_fingerprint"] = SYSTEM_FINGERPRINT

        if body.stream:
            started: set[int] = set()
            tool_streams: dict[int, Any] = {}  # choice index -> its ToolCallStream

            def chunks(index: int, completion: Any, choices: Choices) -> list[dict]:
                out = []
                if index not in started:  # OpenAI streams the role first, in its own chunk
                    started.add(index)
                    out.append(
                        {
                            "choices": [
                                {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                            ]
                        }
                    )
                new = choices.new_text(index, completion)
                if new is not None:
                    text, tokens, logprobs, _ = new
                    delta = {"content": text} if text else {}
                    lp = self.chat_logprobs(tokens, logprobs, top) if logprobs is not None else None
                    choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": _finish_reason(completion.finish_reason)}
                    if body.return_token_ids:
                        choice["token_ids"] = list(tokens)
                    out.append({"choices": [choice]})
                return out if plan is None else tool_streams.setdefault(index, plan.stream()).rewrite(out)

            return StreamingResponse(self.stream(sink, choices, chunks, body.include_usage(), header), media_type="text/event-stream")

        await self.collect(request, sink, choices)
        prompt_ids = choices.prompt_tokens[request_ids[0]]
        out = [
            {
                "index": index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": self.chat_logprobs(c.token_ids, c.logprobs, top) if c.logprobs is not None else None,
                "finish_reason": _finish_reason(c.finish_reason),
                **({"token_ids": list(c.token_ids), "prompt_token_ids": list(prompt_ids)} if body.return_token_ids else {}),
            }
            for index, c in enumerate(choices.choices_of(request_ids[0]))
        ]
        if plan is not None:
            out = [tool_call_choice(choice, plan) for choice in out]
        return {**header, "object": "chat.completion", "choices": out, "usage": choices.usage()}

    def chat_logprobs(self, tokens: tuple[int, ...], logprobs: tuple[dict[int, float], ...], top: int) -> dict:
        def entry(token_id: int, logprob: float | None) -> dict:
            return {"token": self.token_text(token_id), "logprob": logprob, "bytes": list(self.token_bytes(token_id))}

        content = []
        for token_id, lp in zip(tokens, logprobs):
            best = sorted(lp.items(), key=lambda kv: -kv[1])[:top]
            content.append({**entry(token_id, lp.get(token_id)), "top_logprobs": [entry(k, v) for k, v in best]})
        return {"content": content}

    # ---- /tokenize, /detokenize (vLLM) -------------------------------------------------------

    async def tokenize(self, body: TokenizeRequest) -> dict:
        body.check()
        if body.model is not None:
            self.state.adapter_for(body.model)  # 404 for an unknown model, as the /v1 routes
        if body.messages is not None:
            tokens = await self.in_tokenizer_thread(self.chat_prompt, body)
        else:
            tokens = await self.in_tokenizer_thread(self.tokenizer.encode, body.prompt, add_special_tokens=body.add_special_tokens)
        return {"count": len(tokens), "max_model_len": self.state.max_model_len, "tokens": tokens}

    def detokenize(self, body: DetokenizeRequest) -> dict:
        if body.model is not None:
            self.state.adapter_for(body.model)
        vocab = len(self.tokenizer)
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside this tokenizer's vocabulary [0, {vocab})", param="tokens")
        return {"prompt": self.tokenizer.decode(body.tokens)}

    # ---- models and adapters -----------------------------------------------------------------

    def models(self) -> dict:
        base = {
            "id": self.state.model_name,
            "object": "model",
            "created": self.state.created,
            "owned_by": "preft",
            "root": self.state.model_name,
            "parent": None,
        }
        data = [base]
        for info in sorted(self.loop.adapters().values(), key=lambda i: i.name):
            data.append(
                {
                    "id": info.name,
                    "object": "model",
                    "created": self.state.created,
                    "owned_by": "preft",
                    "root": self.state.shown_path(info.path),
                    "parent": self.state.model_name,
                    "kind": info.kind,
                    "policy": info.policy,
                    "rank": info.rank,
                }
            )
        return {"object": "list", "data": data}

    async def load_adapter(self, body: LoadAdapterRequest) -> dict:
        name, path = body.name_and_path()
        if name == self.state.model_name:
            raise APIError(400, f"adapter name {name!r} is the base model's name; choose another", param="lora_name")
        resolved = self.state.resolve_adapter_path(path)
        info = await self.loop.load_adapter(name, resolved, body.policy, max_rank=self.state.max_lora_rank)
        return {
            "object": "adapter",
            "id": info.name,
            "kind": info.kind,
            "policy": info.policy,
            "rank": info.rank,
            "path": self.state.shown_path(info.path),
            "status": "loaded",
        }

    async def unload_adapter(self, body: UnloadAdapterRequest) -> dict:
        if body.name() in self.state.protected_adapters:
            raise APIError(
                403,
                f"adapter {body.name()!r} was given at start-up and is protected (--protect-startup-adapters)",
                param="lora_name",
                code="forbidden",
            )
        info = await self.loop.unload_adapter(body.name(), body.if_in_use)
        return {"object": "adapter", "id": info.name, "status": "unloaded"}


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app serving ``state``. Starting and stopping the engine thread is the caller's job."""
    routes = Routes(state)
    state.created = state.created or int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        state.engine_loop.shutdown()  # fail what is in flight, stop the engine thread

    app = FastAPI(title="preft", description="OpenAI-compatible server for prefill-only adapters", lifespan=lifespan)
    app.add_middleware(RequestGuard, state=state)  # body size, surrogates, counts; unexpected errors as JSON 500s

    async def check_api_key(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(token.encode(), state.api_key.encode()):
            raise APIError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'", code="invalid_api_key")

    v1 = [Depends(check_api_key)]

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(400, f"the request body is not valid JSON: {first.get('msg')}"), status_code=400)
        param = ".".join(loc) or None
        message = f"invalid '{param}': {first.get('msg')}" if param else f"invalid request body: {first.get('msg')}"
        return JSONResponse(error_body(400, message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(e.status_code, str(e.detail)), status_code=e.status_code)

    @app.exception_handler(PreftError)
    async def preft_error(request: Request, e: PreftError) -> JSONResponse:
        error = engine_error(e)
        return JSONResponse(error.body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, "internal error; the server log has its details"), status_code=500)

    @app.post("/v1/completions", dependencies=v1)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        try:
            return await routes.completions(body, request)
        except ClientGone:
            return PlainTextResponse("", status_code=499)

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        try:
            return await routes.chat_completions(body, request)
        except ClientGone:
            return PlainTextResponse("", status_code=499)

    @app.get("/v1/models", dependencies=v1)
    async def models() -> dict:
        return routes.models()

    @app.post("/v1/load_lora_adapter", dependencies=v1)
    @app.post("/v1/load_reft_adapter", dependencies=v1)
    async def load_adapter(body: LoadAdapterRequest) -> dict:
        return await routes.load_adapter(body)

    @app.post("/v1/unload_lora_adapter", dependencies=v1)
    @app.post("/v1/unload_reft_adapter", dependencies=v1)
    async def unload_adapter(body: UnloadAdapterRequest) -> dict:
        return await routes.unload_adapter(body)

    @app.post("/tokenize", dependencies=v1)
    async def tokenize(body: TokenizeRequest) -> dict:
        return await routes.tokenize(body)

    @app.post("/detokenize", dependencies=v1)
    async def detokenize(body: DetokenizeRequest) -> dict:
        return routes.detokenize(body)

    @app.get("/version")
    async def version() -> dict:
        return {"version": preft.__version__}

    @app.get("/health")
    async def health() -> JSONResponse:
        if not state.engine_loop.alive:
            return JSONResponse(error_body(503, "the engine is not running"), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        stats = (
            await asyncio.wait_for(state.engine_loop.stats(), timeout=30) if state.engine_loop.alive else state.engine_loop.stats_snapshot
        )
        text = state.engine_loop.metrics.render(stats, len(state.engine_loop.adapters()))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    return app
