"""The engine thread: the one thread that touches the ``LLMEngine``.

HTTP handlers run on the asyncio event loop and never call the engine. They put commands (plain
callables) on a thread-safe queue; the engine thread runs them between ``step()`` calls, and
delivers each request's outputs to that request's ``asyncio.Queue`` with
``loop.call_soon_threadsafe``. The outputs are the engine's token-id deltas, handed over as they are
(each step's delta objects are new and the engine never touches them again): no copy and no
detokenisation here; the request's asyncio task turns them into text (``preft.engine.detokenizer``). Adapter loads and unloads go through the same queue, so the engine
never sees two threads.

Unloading an adapter that requests still use only affects those requests: by default the
adapter stops accepting new requests and is removed when its last request finishes (the engine's
adapter manager keeps that record; this loop only answers the waiting unload).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from preft.engine.parallel import TensorParallelError
from preft.engine.sequence import RequestOutput
from preft.errors import PreftError
from preft.server.metrics import Metrics
from preft.server.protocol import APIError, ModelNotFound, engine_error

logger = logging.getLogger("preft.server")


@dataclass(frozen=True)
class RequestFailed:
    """Sent instead of an update when a request ends without finishing (adapter unloaded, shutdown, engine error)."""

    request_id: str
    error: APIError


@dataclass
class _Stream:
    request_id: str
    adapter: str | None
    sink: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    arrival: float = field(default_factory=time.perf_counter)
    last_token_time: float | None = None
    num_tokens: int = 0

    def deliver(self, item: RequestOutput | RequestFailed) -> None:
        try:
            self.loop.call_soon_threadsafe(self.sink.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


class EngineLoop:
    """Owns ``llm.engine`` on a background thread; every public method is safe to call from any thread."""

    def __init__(self, llm: Any, metrics: Metrics | None = None, idle_poll_s: float = 0.5):
        self.llm = llm
        self.engine = llm.engine
        self.metrics = metrics or Metrics(getattr(llm, "model_name", "preft"))  # the model_name label
        self._idle_poll_s = idle_poll_s
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._unloading: dict[str, list[concurrent.futures.Future]] = {}
        self._adapters = {info.name: info for info in self.engine.list_adapters()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="preft-engine", daemon=True)
        self.stats_snapshot: dict = dict(self.engine.stats())
        self._users_snapshot: dict[str, set[str]] = {}  # adapter name -> its requests, as of the last loop
        self.error: str | None = None  # set if the engine thread died
        self.on_crash: Callable[[], None] | None = None  # called when it does (``preft serve``: stop the server)

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Fail every in-flight request, stop the engine thread and wait for it."""
        if not self._thread.is_alive():
            return
        self._commands.put((self._abort_all, None))
        self._stop.set()
        self._commands.put((lambda: None, None))  # wake the thread if it is idle
        self._thread.join(timeout)

    def abort_all(self) -> None:
        """End every in-flight request with a 503 "shutting down" error (streams get an error chunk and ``[DONE]``)."""
        if self._thread.is_alive():
            self._commands.put((self._abort_all, None))

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def adapters(self) -> dict[str, Any]:
        """Registered adapters, ``name -> AdapterInfo`` (a copy, safe to read anywhere)."""
        return dict(self._adapters)

    # ---- API for the event loop --------------------------------------------------------------

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn()`` on the engine thread; the future holds its result or exception."""
        if not self._thread.is_alive():
            raise APIError(503, f"the engine is not running ({self.error or 'shut down'})")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, future))
        return future

    async def submit(self, request_id: str, prompt: str | list[int], params: Any, adapter: str | None, sink: asyncio.Queue) -> None:
        """Add a request; its ``RequestOutput`` deltas (then maybe a ``RequestFailed``) arrive on ``sink``.

        Raises ``ModelNotFound`` for an unknown or unloading adapter and ``APIError(400)`` for input
        the engine rejects (e.g. a prompt longer than the context).
        """
        stream = _Stream(request_id, adapter, sink, asyncio.get_running_loop())
        read_back = await asyncio.to_thread(self._read_evicted, adapter) if adapter is not None else None
        await asyncio.wrap_future(self.call(lambda: self._add_request(stream, prompt, params, read_back)))

    def _read_evicted(self, name: str) -> Any:
        """On a worker thread: the adapter read back from disk if it left host memory (the engine thread never reads it)."""
        manager = getattr(self.engine, "adapters", None)
        if not hasattr(manager, "read_evicted"):
            return None
        try:
            return manager.read_evicted(name)
        except PreftError:  # changed or gone: the engine fails the request when it needs the adapter
            return None

    def abort(self, request_id: str) -> None:
        """Cancel a request (e.g. its client disconnected): its KV blocks and adapter slot are freed."""
        if self._thread.is_alive():
            self._commands.put((lambda: self._abort(request_id, None), None))

    def stop_sequence(self, request_id: str, index: int) -> None:
        """End completion ``index`` of a request: its detokenizer found a stop string (the rest of its tokens are dropped)."""
        if self._thread.is_alive():
            self._commands.put((lambda: self._stop_sequence(request_id, index), None))

    async def load_adapter(self, name: str, path: str, policy: str | None, max_rank: int | None = None) -> Any:
        """Read and validate the adapter on a worker thread (the engine thread never waits on a disk or a
        validation), then register it on the engine thread. Errors name the adapter, never a host path."""
        self._check_new_name(name)
        adapter = await asyncio.to_thread(self._read_adapter, name, path, policy, max_rank)
        return await asyncio.wrap_future(self.call(lambda: self._load_adapter(name, adapter, path)))

    async def unload_adapter(self, name: str, if_in_use: str = "wait") -> Any:
        future: concurrent.futures.Future = concurrent.futures.Future()
        if not self._thread.is_alive():
            raise APIError(503, "the engine is not running")
        self._commands.put((lambda: self._unload_adapter(name, if_in_use, future), None))
        return await asyncio.wrap_future(future)

    async def stats(self) -> dict:
        """Fresh ``engine.stats()``, read on the engine thread."""
        return await asyncio.wrap_future(self.call(self._refresh_stats))

    def users(self, name: str) -> set[str]:
        """Ids of the requests that use adapter ``name`` (the adapter manager's record, read on the engine thread)."""
        return set(self._users_snapshot.get(name, ()))

    # ---- the engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.engine.has_unfinished_requests():
                    try:  # idle: sleep until a command arrives
                        self._execute(self._commands.get(timeout=self._idle_poll_s))
                    except queue.Empty:
                        continue
                while True:  # run everything queued before the next step
                    try:
                        self._execute(self._commands.get_nowait())
                    except queue.Empty:
                        break
                if self.engine.has_unfinished_requests() and not self._stop.is_set():
                    self._step()
                self._refresh_stats()
        except BaseException:  # the engine is broken: fail everything, say why, and stop
            self.error = traceback.format_exc()
            logger.error("engine thread crashed:\n%s", self.error)
            self._fail_all(APIError(500, "the engine failed; see the server log"))
            if self.on_crash is not None:
                self.on_crash()
            raise

    def _execute(self, command: tuple[Callable[[], Any], concurrent.futures.Future | None]) -> None:
        fn, future = command
        try:
            result = fn()
        except Exception as e:  # errors belong to the caller that sent the command
            if future is None:
                logger.exception("engine command failed")
            else:
                future.set_exception(e)
            return
        if future is not None:
            future.set_result(result)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except TensorParallelError:  # a rank died: the engine cannot go on (the thread ends, see _run)
            raise
        except Exception:
            logger.exception("engine step failed; failing its requests")
            self._fail_all(APIError(500, "the engine failed while running this request; see the server log"))
            return
        now = time.perf_counter()
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:  # aborted after the engine scheduled it
                continue
            error = getattr(output, "error", None)
            if error is not None:  # this request alone failed; the engine keeps stepping for the others
                self.metrics.request_finished("error")
                stream.deliver(RequestFailed(output.request_id, APIError(500, f"the request failed: {error}", code="request_failed")))
                self._forget(stream)
                continue
            n = sum(c.num_tokens for c in output.outputs)
            if n > stream.num_tokens:
                if stream.last_token_time is None:
                    self.metrics.first_token(now - stream.arrival)
                    if n - stream.num_tokens > 1:
                        self.metrics.later_tokens(0.0, n - stream.num_tokens - 1)
                else:
                    self.metrics.later_tokens(now - stream.last_token_time, n - stream.num_tokens)
                stream.last_token_time, stream.num_tokens = now, n
            stream.deliver(output)
            if output.finished:
                self.metrics.latency(now - stream.arrival)
                for c in output.outputs:
                    self.metrics.request_finished(c.finish_reason or "stop")
                self._forget(stream)
        self._finish_unloads()

    def _add_request(self, stream: _Stream, prompt: str | list[int], params: Any, read_back: Any = None) -> None:
        name = stream.adapter
        if name is not None:
            if name in self._unloading:
                raise ModelNotFound(f"adapter {name!r} is being unloaded and takes no new requests")
            if name not in self._adapters:
                raise ModelNotFound(f"the model {name!r} does not exist; see GET /v1/models")
            if read_back is not None:
                self.engine.adapters.restore(name, read_back)
        if stream.request_id in self._streams:
            raise APIError(400, f"request id {stream.request_id!r} is already in use")
        try:
            self.engine.add_request(stream.request_id, prompt, params, name)
        except PreftError as e:
            raise engine_error(e) from None
        self._streams[stream.request_id] = stream

    def _stop_sequence(self, request_id: str, index: int) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        self.engine.stop_sequence(request_id, index)
        if request_id not in self.engine.requests:  # that was its last completion
            self.metrics.latency(time.perf_counter() - stream.arrival)
            self.metrics.request_finished("stop")
            self._forget(stream)
            self._finish_unloads()

    def _abort(self, request_id: str, error: APIError | None) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        self.engine.abort_request(request_id)
        self.metrics.request_finished("abort")
        if error is not None:
            stream.deliver(RequestFailed(request_id, error))
        self._forget(stream)
        self._finish_unloads()

    def _forget(self, stream: _Stream) -> None:
        self._streams.pop(stream.request_id, None)

    def _fail_all(self, error: APIError) -> None:
        for request_id in list(self._streams):
            try:
                self._abort(request_id, error)
            except Exception:  # the engine may be broken; still tell every client
                stream = self._streams.pop(request_id)
                stream.deliver(RequestFailed(request_id, error))
        for name, futures in self._unloading.items():
            for future in futures:
                future.set_exception(APIError(503, f"adapter {name!r} was not unloaded: {error.message}"))
        self._unloading.clear()

    def _abort_all(self) -> None:
        self._fail_all(APIError(503, "the server is shutting down"))

    def _check_new_name(self, name: str) -> None:
        if name in self._adapters:
            raise APIError(400, f"an adapter named {name!r} is already loaded; unload it first or choose another name", param="lora_name")
        if name in self._unloading:
            raise APIError(409, f"adapter {name!r} is still being unloaded; retry when the unload has returned", param="lora_name")

    def _read_adapter(self, name: str, path: str, policy: str | None, max_rank: int | None) -> Any:
        """Runs on a worker thread: the adapter read once from ``path``, validated, converted and hashed, so that
        registering it on the engine thread costs next to nothing."""
        try:
            adapter = self.engine.prepare_adapter(path, policy)
        except PreftError as e:
            message = str(e).replace(str(path), "<adapter>")  # the client sees no host path
            raise APIError(400, f"adapter {name!r} cannot be loaded: {message}", param="lora_path") from None
        except OSError as e:
            raise APIError(400, f"adapter {name!r} cannot be read: {e.strerror or type(e).__name__}", param="lora_path") from None
        rank = adapter.adapter.rank
        if max_rank is not None and rank > max_rank:
            raise APIError(400, f"adapter {name!r} has rank {rank} > --max-lora-rank {max_rank}", param="lora_path")
        return adapter

    def _load_adapter(self, name: str, adapter: Any, path: str) -> Any:
        self._check_new_name(name)  # again: another load of this name may have finished meanwhile
        try:
            info = self.engine.add_adapter(name, adapter)
        except PreftError as e:
            raise APIError(400, f"adapter {name!r} cannot be loaded: {str(e).replace(str(path), '<adapter>')}", param="lora_path") from None
        self._adapters[name] = info
        self.metrics.adapter_event(loaded=True)
        logger.info("loaded adapter %r: %s rank %d, policy %s, from %s", name, info.kind, info.rank, info.policy, path)
        return info

    def _unload_adapter(self, name: str, if_in_use: str, future: concurrent.futures.Future) -> None:
        if name not in self._adapters:
            future.set_exception(ModelNotFound(f"no adapter named {name!r} is loaded"))
            return
        users = self.engine.adapter_users(name)  # the adapter lifecycle lives in the engine's adapter manager
        if users and if_in_use == "error":
            future.set_exception(
                APIError(409, f"adapter {name!r} is in use by {len(users)} request(s): {', '.join(users)}", param="lora_name")
            )
            return
        if users and if_in_use == "abort":
            for request_id in users:
                self._abort(request_id, APIError(409, f"request aborted: its adapter {name!r} was unloaded"))
        try:
            self.engine.remove_adapter(name, wait=True)  # now, or when its last request ends
        except Exception as e:
            future.set_exception(APIError(500, f"adapter {name!r} could not be unloaded: {e}"))
            return
        self._unloading.setdefault(name, []).append(future)
        if users and if_in_use == "wait":
            logger.info("unloading adapter %r: waiting for %d request(s) that use it", name, len(users))
        self._finish_unloads()

    def _finish_unloads(self) -> None:
        """Answer the unloads whose adapter the engine has removed (its last request ended)."""
        for name in [n for n in self._unloading if not self.engine.adapter_users(n)]:
            info = self._adapters.pop(name)
            self.metrics.adapter_event(loaded=False)
            logger.info("unloaded adapter %r", name)
            for future in self._unloading.pop(name):
                future.set_result(info)

    def _refresh_stats(self) -> dict:
        self._users_snapshot = {name: set(self.engine.adapter_users(name)) for name in self._adapters}
        self.stats_snapshot = dict(self.engine.stats())
        return self.stats_snapshot
