"""Server bookkeeping against a fake engine whose steps a test can hold: unload while in use, disconnects.

A held engine makes "this request is still running" a fact, not a race, so these cases are
exact. Outputs of the real engine are checked in ``test_app.py``.
"""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
from server_fake_engine import FakeLLM, next_token
from server_helpers import ServerThread, wait_until


@pytest.fixture
def fake_server(tiny_model, adapter_root):
    llm = FakeLLM(tiny_model)
    llm.add_adapter("lora-p", adapter_root / "lora-p")
    llm.add_adapter("lora-a", adapter_root / "lora-a")
    server = ServerThread(llm, adapter_root=adapter_root)
    yield server
    engine_of(server).gate = None
    server.stop()


def engine_of(server):
    return server.engine_loop.engine


def expected_text(llm_tokenizer, prompt_ids, adapter, n):
    return llm_tokenizer.decode([next_token(prompt_ids, adapter, i) for i in range(n)])


def test_completion_text_is_the_engines_tokens(fake_server):
    client = openai.OpenAI(base_url=fake_server.url + "/v1", api_key="x")
    out = client.completions.create(model="lora-p", prompt=[7, 8, 9], max_tokens=5, temperature=0)
    assert out.choices[0].text == expected_text(fake_server.state.tokenizer, [7, 8, 9], "lora-p", 5)
    assert out.usage.prompt_tokens == 3 and out.usage.completion_tokens == 5
    chunks = list(client.completions.create(model="lora-p", prompt=[7, 8, 9], max_tokens=5, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text


def hold(server):
    gate = threading.Event()
    engine_of(server).gate = gate
    return gate


def test_unload_waits_for_the_requests_using_the_adapter_and_refuses_new_ones(fake_server):
    gate = hold(fake_server)
    client = httpx.Client(base_url=fake_server.url, timeout=30)
    result = {}
    running = threading.Thread(
        target=lambda: result.update(r=client.post("/v1/completions", json={"model": "lora-p", "prompt": [5, 6], "max_tokens": 3}))
    )
    running.start()
    wait_until(lambda: fake_server.engine_loop.users("lora-p"), what="the request to be running")
    unloaded = {}
    unloading = threading.Thread(target=lambda: unloaded.update(r=client.post("/v1/unload_lora_adapter", json={"lora_name": "lora-p"})))
    unloading.start()
    wait_until(lambda: "lora-p" in fake_server.engine_loop._unloading, what="the unload to be pending")
    refused = client.post("/v1/completions", json={"model": "lora-p", "prompt": [5], "max_tokens": 1})
    assert refused.status_code == 404 and "being unloaded" in refused.json()["error"]["message"]
    assert "lora-p" in fake_server.engine_loop.adapters()  # still there while its request runs
    gate.set()
    running.join(30)
    unloading.join(30)
    assert result["r"].status_code == 200 and result["r"].json()["choices"][0]["finish_reason"] == "length"
    assert unloaded["r"].status_code == 200
    assert "lora-p" not in fake_server.engine_loop.adapters()
    assert client.post("/v1/completions", json={"model": "lora-a", "prompt": [5], "max_tokens": 2}).status_code == 200


def test_unload_with_if_in_use_error_is_409_and_abort_fails_only_that_adapters_requests(fake_server):
    gate = hold(fake_server)
    client = httpx.Client(base_url=fake_server.url, timeout=30)
    results = {}

    def request(model):
        results[model] = client.post("/v1/completions", json={"model": model, "prompt": [5, 6], "max_tokens": 2})

    threads = [threading.Thread(target=request, args=(m,)) for m in ("lora-p", "lora-a")]
    for t in threads:
        t.start()
    wait_until(lambda: fake_server.engine_loop.users("lora-p") and fake_server.engine_loop.users("lora-a"), what="both requests running")
    busy = client.post("/v1/unload_lora_adapter", json={"lora_name": "lora-p", "if_in_use": "error"})
    assert busy.status_code == 409 and "in use by 1 request" in busy.json()["error"]["message"]
    aborted = client.post("/v1/unload_lora_adapter", json={"lora_name": "lora-p", "if_in_use": "abort"})
    assert aborted.status_code == 200
    gate.set()
    for t in threads:
        t.join(30)
    assert results["lora-p"].status_code == 409 and "was unloaded" in results["lora-p"].json()["error"]["message"]
    assert results["lora-a"].status_code == 200  # the other adapter's request is untouched
    assert not engine_of(fake_server).requests


def test_client_disconnect_aborts_the_engine_request(fake_server):
    gate = hold(fake_server)
    with httpx.Client(base_url=fake_server.url, timeout=30) as client:
        with client.stream(
            "POST", "/v1/completions", json={"model": "lora-a", "prompt": [5], "max_tokens": 50, "stream": True}
        ) as response:
            assert response.status_code == 200
            wait_until(lambda: engine_of(fake_server).requests, what="the request to reach the engine")
            gate.set()
            next(response.iter_lines())  # the first chunk arrived; now hang up
    wait_until(lambda: not engine_of(fake_server).requests, what="the aborted request to leave the engine")
    assert not fake_server.engine_loop._streams and not fake_server.engine_loop.users("lora-a")
