"""Limits, input validation and containment: every client error is a 4xx naming its field, before any work,
and the connection stays usable. Runs against the fake engine (server plumbing only)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import threading

import httpx
import pytest
from server_fake_engine import FakeLLM
from server_helpers import ServerThread, wait_until

from preft.server.limits import ServerLimits

LIMITS = ServerLimits(
    max_request_body_bytes=64 << 10, max_n=4, max_prompts_per_request=3, max_choices_per_request=6, max_stop_sequences=2, max_stop_length=8
)


@pytest.fixture
def server(tiny_model, adapter_root):
    llm = FakeLLM(tiny_model)
    llm.add_adapter("lora-p", adapter_root / "lora-p")
    server = ServerThread(llm, adapter_root=adapter_root, model_dir=str(tiny_model))
    server.state.limits = LIMITS
    server.state.protected_adapters = frozenset({"lora-p"})
    yield server
    server.engine_loop.engine.gate = None
    server.stop()


def error_of(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert param is None or error["param"] == param, error
    return error


def good(model: str = "lora-p", **fields) -> dict:
    return {"model": model, "prompt": "hi", "max_tokens": 2, **fields}


CHAT = {"model": "lora-p", "max_tokens": 2}


@pytest.mark.parametrize(
    ("route", "body", "status", "param"),
    [
        ("/v1/completions", good(n=5), 400, "n"),
        ("/v1/completions", good(best_of=5), 400, "best_of"),
        ("/v1/completions", good(prompt=["a", "b", "c", "d"]), 400, "prompt"),
        ("/v1/completions", good(prompt=["a", "b", "c"], n=3), 400, "n"),
        ("/v1/completions", good(stop=["a", "b", "c"]), 400, "stop"),
        ("/v1/completions", good(stop="x" * 9), 400, "stop"),
        ("/v1/completions", good(stop_token_ids=[1, 2, 3]), 400, "stop_token_ids"),
        ("/v1/completions", good(seed=2**64), 400, "seed"),
        ("/v1/completions", good(prompt="a\ud800b"), 400, "prompt"),
        ("/v1/completions", good(prompt=["ok", "\udc00"]), 400, "prompt.1"),
        ("/v1/completions", good(prompt="x" * 60_000), 400, "prompt"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "\ud83d"}]}, 400, "messages.0.content"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400, "messages"),
        ("/v1/load_lora_adapter", {"lora_name": "a\ud800", "lora_path": "lora-a"}, 400, "lora_name"),
        ("/v1/load_lora_adapter", {"lora_name": "has space", "lora_path": "lora-a"}, 400, "lora_name"),
        ("/v1/load_lora_adapter", {"lora_name": "x" * 129, "lora_path": "lora-a"}, 400, "lora_name"),
        ("/v1/load_lora_adapter", {"lora_name": "nul", "lora_path": "lora-a\x00"}, 400, "lora_path"),
        ("/v1/load_lora_adapter", {"lora_name": "long", "lora_path": "x" * 5000}, 400, "lora_path"),
        ("/v1/unload_lora_adapter", {"lora_name": "lora-p"}, 403, "lora_name"),
    ],
)
def test_each_bad_request_is_a_4xx_naming_its_field_and_the_next_one_succeeds(server, route, body, status, param):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        error_of(client.post(route, content=json.dumps(body), headers={"content-type": "application/json"}), status, param)
        assert client.post("/v1/completions", json=good()).status_code == 200
        models = client.get("/v1/models")
        assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == [server.state.model_name, "lora-p"]


@pytest.mark.parametrize("depth", [900, 30_000])
def test_a_deeply_nested_body_is_never_a_500(server, depth):
    body = json.dumps(good())[:-1] + ', "extra": ' + "[" * depth + "]" * depth + "}"
    with httpx.Client(base_url=server.url, timeout=30) as client:
        response = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert response.status_code in (200, 400), response.text  # accepted (an unknown field) or refused, never a 500
        assert client.post("/v1/completions", json=good()).status_code == 200


def test_a_huge_prompt_is_refused_before_it_is_tokenised(server, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the prompt was tokenised")

    monkeypatch.setattr(server.state.tokenizer, "encode", never)
    body = good(prompt="word " * 12_000)  # 60 kB: under the body limit, over any 256-token context at <= 64 characters a token
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert error_of(client.post("/v1/completions", json=body), 400, "prompt")["code"] == "context_length_exceeded"


def test_an_oversized_body_is_413_before_it_is_parsed(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        error = error_of(client.post("/v1/completions", json=good(prompt="x" * (65 << 10))), 413)
        assert "--max-request-body-bytes" in error["message"]
        assert client.post("/v1/completions", json=good()).status_code == 200


def test_a_tiny_temperature_samples_greedily(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        tiny = client.post("/v1/completions", json=good(temperature=1e-40))
        zero = client.post("/v1/completions", json=good(temperature=0))
        assert tiny.status_code == 200 and tiny.json()["choices"][0]["text"] == zero.json()["choices"][0]["text"]


def test_an_unexpected_error_is_a_json_500_naming_no_internals_and_keeps_the_connection(server, monkeypatch):
    def broken():
        raise RuntimeError("secret /host/path detail")

    monkeypatch.setattr(server.engine_loop, "adapters", broken)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", "/v1/models")
        response = conn.getresponse()
        body = json.loads(response.read())
        sock = conn.sock
        assert response.status == 500 and "secret" not in body["error"]["message"] and "RuntimeError" not in body["error"]["message"]
        assert response.getheader("connection") != "close"
        monkeypatch.undo()
        conn.request("GET", "/v1/models")
        again = conn.getresponse()
        assert again.status == 200 and conn.sock is sock, "the keep-alive connection was dropped after the 500"
        again.read()
    finally:
        conn.close()


def test_adapter_paths_stay_inside_the_root_and_no_host_path_is_shown(server, adapter_root, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(adapter_root / "lora-a", outside)
    (adapter_root / "link-dir").unlink(missing_ok=True)
    os.symlink(outside, adapter_root / "link-dir")
    sneaky = adapter_root / "sneaky"
    shutil.rmtree(sneaky, ignore_errors=True)
    sneaky.mkdir()
    shutil.copy(outside / "adapter_config.json", sneaky / "adapter_config.json")
    os.symlink(outside / "adapter_model.safetensors", sneaky / "adapter_model.safetensors")  # a file link leaving the root
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for path in ("link-dir", "sneaky", str(outside)):
            error = error_of(client.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": path}), 403, "lora_path")
            assert str(tmp_path) not in error["message"]
        missing = error_of(client.post("/v1/load_lora_adapter", json={"lora_name": "gone", "lora_path": "no-such"}), 400, "lora_path")
        assert str(adapter_root) not in missing["message"] and "'gone'" in missing["message"]
        assert client.post("/v1/load_lora_adapter", json={"lora_name": "lora-a", "lora_path": "lora-a"}).status_code == 200
        models = client.get("/v1/models").text
        assert str(adapter_root) not in models and str(server.state.model_dir) not in models
        by_path = client.post("/v1/completions", json=good(model=str(server.state.model_dir)))
        error_of(by_path, 404, "model")
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "lora-a"}).status_code == 200


def test_shutdown_ends_running_streams_with_an_error_chunk_and_done(tiny_model):
    from preft.server.graceful import GracefulServer

    llm = FakeLLM(tiny_model)
    server = ServerThread(llm)
    server.engine_loop.engine.gate = threading.Event()  # requests stay in flight
    lines: list[str] = []

    def stream() -> None:
        with httpx.stream("POST", server.url + "/v1/completions", json=good(model=server.state.model_name, stream=True), timeout=30) as r:
            lines.extend(line for line in r.iter_lines() if line)

    client = threading.Thread(target=stream)
    client.start()
    wait_until(lambda: server.engine_loop.engine.requests, what="the request to reach the engine")
    graceful = GracefulServer.__new__(GracefulServer)  # uvicorn's server of the thread, with preft's shutdown
    graceful.__dict__.update(server.server.__dict__, engine_loop=server.engine_loop, grace=0.2)
    server.server.shutdown = graceful.shutdown
    server.server.should_exit = True
    client.join(30)
    server.thread.join(30)
    server.engine_loop.shutdown()
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["message"] == "the server is shutting down"
