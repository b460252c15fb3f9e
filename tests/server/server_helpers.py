"""Helpers for the server tests: free ports, bounded polling, a real uvicorn server in a thread."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import uvicorn

from preft.adapters import LoraConfig, ReftConfig
from preft.server.app import ServerState, create_app
from preft.server.engine_loop import EngineLoop

# name -> adapter config; each kind under both policies the server must serve
ADAPTERS = {
    "lora-p": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], policy="prefill"),
    "lora-a": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], policy="all"),
    "direft-p": ReftConfig(kind="direft", r=2, policy="prefill"),
    "loreft-a": ReftConfig(kind="loreft", r=2, policy="all"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``condition()`` until true; fail after ``timeout`` seconds (a bound, not a timing)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


class ServerThread:
    """A real uvicorn server on 127.0.0.1 in a background thread, serving ``llm``."""

    def __init__(self, llm, api_key: str | None = None, adapter_root: Path | None = None, model_dir: str | None = None):
        self.engine_loop = EngineLoop(llm)
        self.engine_loop.start()
        self.state = ServerState(self.engine_loop, llm.tokenizer, llm.model_name, llm.max_model_len, model_dir, api_key, adapter_root)
        self.port = free_port()
        config = uvicorn.Config(create_app(self.state), host="127.0.0.1", port=self.port, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), what="uvicorn to start")
        assert self.server.started, "uvicorn did not start"
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.engine_loop.shutdown()
