"""The server against the real engine, over real HTTP on 127.0.0.1, with the official ``openai`` client.

Reference: the offline engine (``LLM.generate``) on the same checkpoint and adapters, greedy.
"""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import openai
import pytest
from server_helpers import ADAPTERS, ServerThread, wait_until

from preft.engine import LLM, SamplingParams

API_KEY = "sk-test-key"
ENGINE_KNOBS = dict(
    dtype="float32", device="cpu", num_kv_blocks=400, block_size=8, max_adapter_slots=4, max_cpu_adapters=8, max_num_seqs=64
)
MODELS = [None, *ADAPTERS]  # None: the base model


@pytest.fixture(scope="module")
def offline(tiny_model, adapter_root):
    llm = LLM(tiny_model, **ENGINE_KNOBS)
    for name in ADAPTERS:
        llm.add_adapter(name, adapter_root / name)
    for i in range(32):
        llm.add_adapter(f"many-{i:02d}", adapter_root / f"many-{i:02d}")
    return llm


@pytest.fixture(scope="module")
def server(tiny_model, adapter_root):
    llm = LLM(tiny_model, **ENGINE_KNOBS)
    for name in ADAPTERS:
        llm.add_adapter(name, adapter_root / name)
    server = ServerThread(llm, api_key=API_KEY, adapter_root=adapter_root)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def model_id(server, name):
    return server.state.model_name if name is None else name


def greedy(offline, prompt, adapter, max_tokens=8):
    out = offline.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0), adapter=adapter, use_tqdm=False)[0]
    return list(out.outputs[0].token_ids), out.outputs[0].text, out.outputs[0].finish_reason


def chat_ids(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def assert_no_leaks(server):
    stats = asyncio.run(_stats(server))
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0, stats
    assert stats["kv_blocks_used"] == 0 and stats["adapter_slots_used"] == 0, stats
    assert not server.engine_loop._streams and not server.engine_loop.engine.adapters.users


async def _stats(server):
    future = server.engine_loop.call(server.engine_loop.engine.stats)
    return await asyncio.wrap_future(future)


@pytest.mark.parametrize("name", MODELS, ids=lambda n: n or "base")
def test_openai_client_greedy_outputs_equal_the_offline_engine(server, client, offline, name):
    model = model_id(server, name)
    prompt = "The quick brown fox"
    ids, text, reason = greedy(offline, prompt, name)
    out = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, extra_body={"return_token_ids": True})
    assert out.choices[0].token_ids == ids and out.choices[0].text == text
    assert out.choices[0].finish_reason == reason and out.usage.completion_tokens == len(ids)
    assert out.usage.prompt_tokens == len(offline.tokenizer.encode(prompt))

    stream = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"return_token_ids": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert sum((c.choices[0].token_ids for c in chunks if c.choices), []) == ids
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [reason]
    assert chunks[-1].usage.completion_tokens == len(ids)

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    ids, text, reason = greedy(offline, chat_ids(offline.tokenizer, messages), name)
    chat = client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=0, extra_body={"return_token_ids": True}
    )
    assert chat.choices[0].message.content == text and chat.choices[0].token_ids == ids and chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=0, stream=True, extra_body={"return_token_ids": True}
    )
    chunks = [c for c in stream if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert sum((getattr(c.choices[0], "token_ids", None) or [] for c in chunks), []) == ids
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [reason]


def test_batch_of_text_and_token_prompts_keeps_prompt_order(server, client, offline):
    prompts = ["abc", "hello world", "xyz xyz"]
    out = client.completions.create(model="lora-a", prompt=prompts, max_tokens=6, temperature=0, extra_body={"return_token_ids": True})
    assert [c.index for c in out.choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, out.choices):
        assert choice.token_ids == greedy(offline, prompt, "lora-a", 6)[0]
    token_prompts = [[5, 6, 7, 8], [40, 41]]
    out = client.completions.create(
        model="direft-p", prompt=token_prompts, max_tokens=6, temperature=0, extra_body={"return_token_ids": True}
    )
    assert [c.token_ids for c in out.choices] == [greedy(offline, p, "direft-p", 6)[0] for p in token_prompts]
    assert out.usage.prompt_tokens == 6


def test_models_lists_base_and_adapters_with_policy_and_rank(server, client):
    models = {m.id: m for m in client.models.list().data}
    assert server.state.model_name in models
    for name, config in ADAPTERS.items():
        assert models[name].policy == config.policy and models[name].rank == config.r and models[name].parent == server.state.model_name


def test_64_concurrent_streams_across_32_adapters_with_loads_and_unloads(server, offline, adapter_root):
    names = [f"many-{i:02d}" for i in range(32)]
    prompts = [f"request {i}: tell me about {i * 7 % 13}" for i in range(64)]
    expected = [greedy(offline, p, names[i % 32], 6)[0] for i, p in enumerate(prompts)]
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def main():
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120, limits=httpx.Limits(max_connections=100)) as http:
            loads = await asyncio.gather(*(http.post("/v1/load_lora_adapter", json={"lora_name": n, "lora_path": n}) for n in names))
            assert [r.status_code for r in loads] == [200] * 32, [r.text for r in loads if r.status_code != 200]
            started = asyncio.Event()
            n_started = 0

            async def stream(i):
                nonlocal n_started
                body = {
                    "model": names[i % 32],
                    "prompt": prompts[i],
                    "max_tokens": 6,
                    "temperature": 0,
                    "stream": True,
                    "return_token_ids": True,
                }
                tokens, finishes = [], []
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            break
                        choice = json.loads(line[6:])["choices"][0]
                        if n_started < 64 and not tokens:
                            n_started += 1
                            if n_started == 64:
                                started.set()
                        tokens += choice["token_ids"]
                        finishes += [choice["finish_reason"]] if choice["finish_reason"] else []
                return tokens, finishes

            async def churn():
                # loads and unloads of other adapters while the streams run, then unload 8 adapters in use (wait)
                for j in range(6):
                    r = await http.post("/v1/load_reft_adapter", json={"reft_name": f"extra-{j}", "reft_path": "direft-p"})
                    assert r.status_code == 200, r.text
                    r = await http.post("/v1/unload_reft_adapter", json={"reft_name": f"extra-{j}"})
                    assert r.status_code == 200, r.text
                await asyncio.wait_for(started.wait(), 120)
                unloads = await asyncio.gather(*(http.post("/v1/unload_lora_adapter", json={"lora_name": n}) for n in names[:8]))
                assert [r.status_code for r in unloads] == [200] * 8

            results = await asyncio.gather(*(stream(i) for i in range(64)), churn())
            return results[:64]

    results = asyncio.run(main())
    for i, (tokens, finishes) in enumerate(results):
        assert tokens == expected[i], f"request {i} ({names[i % 32]})"
        assert len(finishes) == 1, f"request {i} finished {len(finishes)} times"
    assert_no_leaks(server)
    loaded = server.engine_loop.adapters()
    assert not set(names[:8]) & set(loaded) and set(names[8:]) <= set(loaded)
    with httpx.Client(base_url=server.url, headers=headers) as http:
        gone = http.post("/v1/completions", json={"model": names[0], "prompt": "x", "max_tokens": 2})
        assert gone.status_code == 404
        for n in names[8:]:
            assert http.post("/v1/unload_lora_adapter", json={"lora_name": n}).status_code == 200


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    return body


def test_every_error_case_has_its_status_and_the_next_request_succeeds(server, tiny_model, adapter_root, tmp_path):
    base = server.state.model_name
    good = {"model": "lora-p", "prompt": "hi", "max_tokens": 2}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    bad_dir = adapter_root / "broken"
    bad_dir.mkdir(exist_ok=True)
    (bad_dir / "adapter_config.json").write_text("{not json")
    from transformers import AutoConfig

    from preft.adapters import LoraConfig, save_adapter
    from preft.tiny import build_tiny_checkpoint, random_adapter

    other = AutoConfig.from_pretrained(build_tiny_checkpoint(tmp_path / "qwen3", "qwen3"))
    save_adapter(random_adapter(other, LoraConfig(r=2, target_modules=["q_proj"])), adapter_root / "mismatched")
    outside = tmp_path / "outside"
    shutil.copytree(adapter_root / "lora-p", outside)

    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
        cases = [
            (http.post("/v1/completions", json={**good, "model": "nobody"}), 404, "model"),
            (http.post("/v1/chat/completions", json={"model": "nobody", "messages": [{"role": "user", "content": "x"}]}), 404, "model"),
            (http.post("/v1/completions", json={**good, "temperature": 5}), 400, "temperature"),
            (http.post("/v1/completions", json={**good, "max_tokens": 0}), 400, "max_tokens"),
            (http.post("/v1/completions", json={"model": base, "max_tokens": 2}), 400, "prompt"),
            (http.post("/v1/completions", json={**good, "presence_penalty": 2.5}), 400, "presence_penalty"),
            (http.post("/v1/chat/completions", json={"model": base, "messages": []}), 400, "messages"),
            (http.post("/v1/completions", content=b"{oops", headers={"content-type": "application/json"}), 400, None),
            (http.post("/v1/completions", json={**good, "prompt": [7] * (server.state.max_model_len + 5)}), 400, "prompt"),
            (http.post("/v1/completions", json={**good, "prompt": [7] * 10, "max_tokens": server.state.max_model_len}), 400, "max_tokens"),
            (http.post("/v1/completions", json=good, headers={"Authorization": "Bearer wrong"}), 401, None),
            (httpx.post(server.url + "/v1/models"), 405, None),
            (httpx.get(server.url + "/v1/models"), 401, None),
            (http.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": str(outside)}), 403, "lora_path"),
            (http.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": "../outside"}), 403, "lora_path"),
            (http.post("/v1/load_lora_adapter", json={"lora_name": "broken", "lora_path": "broken"}), 400, "lora_path"),
            (http.post("/v1/load_lora_adapter", json={"lora_name": "mismatched", "lora_path": "mismatched"}), 400, "lora_path"),
            (http.post("/v1/load_lora_adapter", json={"lora_name": "lora-p", "lora_path": "lora-p"}), 400, "lora_name"),
            (http.post("/v1/unload_lora_adapter", json={"lora_name": "nobody"}), 404, "model"),
        ]
        for i, (response, status, param) in enumerate(cases):
            body = error_of(response, status)
            assert param is None or body["param"] == param, (i, body)
            after = http.post("/v1/completions", json=good)
            assert after.status_code == 200 and after.json()["choices"][0]["text"] is not None
        assert "broken" not in server.engine_loop.adapters() and "mismatched" not in server.engine_loop.adapters()
        assert http.get("/health").json() == {"status": "ok"}
    assert_no_leaks(server)


def test_openai_client_raises_its_typed_errors(server):
    bad_key = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nobody", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model="lora-p", prompt="x", max_tokens=1, top_p=0)


def test_metrics_count_requests_tokens_and_latencies(server, client):
    from prometheus_client.parser import text_string_to_metric_families

    client.completions.create(model="lora-p", prompt="metrics", max_tokens=3, temperature=0)
    families = text_string_to_metric_families(httpx.get(server.url + "/metrics").text)
    samples = [s for family in families for s in family.samples]
    assert all(s.labels.get("model_name") == server.state.model_name for s in samples)  # vLLM's label, on every series
    values = {s.name: s.value for s in samples if set(s.labels) == {"model_name"}}
    assert values["vllm:generation_tokens_total"] >= 3 and values["vllm:prompt_tokens_total"] >= 7
    assert values["vllm:time_to_first_token_seconds_count"] >= 1 and values["vllm:time_per_output_token_seconds_count"] >= 2
    assert sum(s.value for s in samples if s.name == "vllm:request_success_total") >= 1
    assert values["preft:kv_blocks_used"] == 0 and values["vllm:kv_cache_usage_perc"] == 0 and values["preft:adapter_slots_total"] == 4
    assert values["vllm:num_requests_running"] == 0
    assert "preft:cpu_adapter_cache_hits_total" in values and "preft:cpu_adapter_cache_misses_total" in values


def test_client_disconnect_mid_stream_aborts_and_frees_kv_blocks_and_slot(server):
    aborted_before = server.engine_loop.metrics.requests.get("abort", 0)
    body = {"model": "lora-a", "prompt": "a long one", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # generating now; hang up
    wait_until(lambda: not server.engine_loop._streams, what="the request to be aborted")
    assert server.engine_loop.metrics.requests.get("abort", 0) == aborted_before + 1
    assert_no_leaks(server)


def test_n_choices_that_finish_at_different_steps_each_stream_one_finish_and_their_full_text(server, client, offline):
    # choice i samples with seed + i; a stop token id met early by choice 0 only makes choice 0 finish first
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=11, n=2, ignore_eos=True)
    full = offline.generate([[50, 51, 52]], params, use_tqdm=False)[0].outputs
    stop_id = next(t for t in full[0].token_ids[:3] if t not in full[1].token_ids[:6])
    body = dict(
        model=server.state.model_name,
        prompt=[50, 51, 52],
        max_tokens=10,
        temperature=1.0,
        seed=11,
        n=2,
        extra_body={"return_token_ids": True},
    )
    body["extra_body"].update(ignore_eos=True, stop_token_ids=[stop_id])
    whole = client.completions.create(**body)
    assert [c.finish_reason for c in whole.choices] == ["stop", "length"]
    assert len(whole.choices[0].token_ids) < len(whole.choices[1].token_ids) == 10
    chunks = [c for c in client.completions.create(**body, stream=True) if c.choices]
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices[0].index == choice.index]
        assert [c.finish_reason for c in mine if c.finish_reason] == [choice.finish_reason]
        assert mine[-1].finish_reason == choice.finish_reason  # nothing after a choice's finish
        assert "".join(c.text for c in mine) == choice.text and sum((c.token_ids for c in mine), []) == choice.token_ids
        assert all(c.text or c.finish_reason for c in mine)  # no empty chunk while generating
