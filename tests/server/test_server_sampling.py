"""Sampling knobs over real HTTP with the ``openai`` client: each one changes the output as it should, the server
passes it to the engine exactly (same tokens as the offline engine), bad values are 400s, and generation_config.json
defaults fill only what a request leaves out."""

from __future__ import annotations

import argparse
import json

import httpx
import openai
import pytest
from server_helpers import ServerThread

from preft.engine import LLM, SamplingParams
from preft.server.cli import add_arguments, build_state

API_KEY = "sk-sampling"
KNOBS = dict(dtype="float32", device="cpu", num_kv_blocks=200, block_size=8)
PROMPT = [50, 51, 52, 53]


@pytest.fixture(scope="module")
def offline(tiny_model):
    return LLM(tiny_model, **KNOBS)


@pytest.fixture(scope="module")
def server(tiny_model):
    server = ServerThread(LLM(tiny_model, **KNOBS), api_key=API_KEY)
    yield server
    server.stop()


@pytest.fixture()
def client(server):
    server.state.sampling_defaults = {}
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def tokens(client, server, **body) -> list[int]:
    extra = {"return_token_ids": True, **body.pop("extra_body", {})}
    out = client.completions.create(model=server.state.model_name, prompt=PROMPT, extra_body=extra, **body)
    return out.choices[0].token_ids


def offline_tokens(offline, **params) -> list[int]:
    return offline.generate([PROMPT], SamplingParams(**params), use_tqdm=False)[0].outputs[0].token_ids


def test_logit_bias_plus_100_forces_a_token_and_minus_100_bans_one(client, server):
    forced = tokens(client, server, max_tokens=6, temperature=1.0, seed=3, logit_bias={"42": 100}, extra_body={"ignore_eos": True})
    assert forced == [42] * 6
    greedy = tokens(client, server, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    banned = tokens(client, server, max_tokens=6, temperature=0, logit_bias={str(greedy[0]): -100}, extra_body={"ignore_eos": True})
    assert greedy[0] not in banned and banned != greedy


def test_min_tokens_holds_off_eos_and_stop_token_ids(client, server, offline):
    eos = next(iter(offline.engine.eos_token_ids))
    eager = {"logit_bias": {str(eos): 100}}  # EOS is the only likely token
    assert tokens(client, server, max_tokens=16, temperature=0, **eager) == [eos]
    held = tokens(client, server, max_tokens=16, temperature=0, **eager, extra_body={"min_tokens": 8})
    assert len(held) == 9 and eos not in held[:8] and held[8] == eos
    stop_id = tokens(client, server, max_tokens=1, temperature=0)[0]
    by_id = tokens(client, server, max_tokens=16, temperature=0, extra_body={"stop_token_ids": [stop_id], "min_tokens": 8})
    assert len(by_id) >= 8 and stop_id not in by_id[:8]


def test_a_strong_repetition_penalty_stops_a_greedy_loop(client, server):
    looped = tokens(client, server, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    assert len(set(looped)) < len(looped)  # the tiny random model repeats itself when greedy
    fresh = tokens(client, server, max_tokens=24, temperature=0, extra_body={"ignore_eos": True, "repetition_penalty": 50.0})
    assert len(set(fresh)) == len(fresh) and not set(fresh) & set(PROMPT)


@pytest.mark.parametrize(
    "knobs",
    [
        dict(temperature=0.9, seed=1, presence_penalty=1.5),
        dict(temperature=0.9, seed=2, frequency_penalty=-1.0, logit_bias={"7": 3.5, "8": -2}),
        dict(temperature=1.0, seed=3, extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.3}),
        dict(temperature=1.0, seed=4, top_p=0.6, extra_body={"top_k": -1}),
    ],
    ids=["presence", "frequency+bias", "top_k+min_p+repetition", "top_p+top_k_off"],
)
def test_each_knob_reaches_the_engine_exactly(client, server, offline, knobs):
    extra = dict(knobs.pop("extra_body", {}))
    got = tokens(client, server, max_tokens=10, extra_body={"ignore_eos": True, **extra}, **knobs)
    params = {**knobs, **extra, "top_k": max(extra.get("top_k", 0), 0)}
    if "logit_bias" in params:
        params["logit_bias"] = {int(k): v for k, v in params["logit_bias"].items()}
    assert got == offline_tokens(offline, max_tokens=10, ignore_eos=True, **params)
    plain = offline_tokens(offline, max_tokens=10, ignore_eos=True, temperature=knobs["temperature"], seed=knobs["seed"])
    assert got != plain  # the knob changed what was sampled


def test_chat_completions_take_the_knobs_too(client, server):
    out = client.chat.completions.create(
        model=server.state.model_name,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        logit_bias={"61": 100},
        extra_body={"return_token_ids": True, "ignore_eos": True, "min_tokens": 4, "min_p": 0.5},
    )
    assert out.choices[0].token_ids == [61] * 4


@pytest.mark.parametrize(
    "field, body",
    [
        ("logit_bias", {"logit_bias": {"x": 1}}),
        ("logit_bias", {"logit_bias": {"5": 150}}),
        ("presence_penalty", {"presence_penalty": 2.5}),
        ("frequency_penalty", {"frequency_penalty": -3}),
        ("repetition_penalty", {"repetition_penalty": 0}),
        ("repetition_penalty", {"repetition_penalty": 1e-300}),  # would scale logits to inf: a 400, not a failed request
        ("min_p", {"min_p": 1.5}),
        ("min_tokens", {"min_tokens": -1}),
        ("min_tokens", {"min_tokens": 9, "max_tokens": 4}),
        ("logit_bias", {"logit_bias": {"99999999": 1}}),
    ],
)
def test_bad_knobs_are_400s_that_name_the_field(server, field, body):
    response = httpx.post(
        server.url + "/v1/completions",
        json={"model": server.state.model_name, "prompt": PROMPT, "max_tokens": 4, **body},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"], error


def test_generation_config_defaults_fill_only_what_the_request_leaves_out(client, server, offline):
    server.state.sampling_defaults = {"temperature": 0.0, "repetition_penalty": 50.0, "top_k": 1}
    defaulted = tokens(client, server, max_tokens=12, extra_body={"ignore_eos": True})
    assert defaulted == offline_tokens(offline, max_tokens=12, ignore_eos=True, temperature=0.0, repetition_penalty=50.0)
    overridden = tokens(
        client, server, max_tokens=12, temperature=1.0, seed=9, extra_body={"ignore_eos": True, "repetition_penalty": 1.0, "top_k": 0}
    )
    assert overridden == offline_tokens(offline, max_tokens=12, ignore_eos=True, temperature=1.0, seed=9)
    assert overridden != defaulted


def test_serve_generation_config_flag_reads_the_models_file_a_folder_or_nothing(tiny_model, tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    folder = tmp_path / "gen"
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "top_p": 0.5, "min_p": 0.2, "max_new_tokens": 7}))
    assert parser.parse_args([str(tiny_model)]).generation_config == "auto"
    for flag, expected in [(str(folder), {"temperature": 0.3, "top_p": 0.5, "min_p": 0.2}), ("vllm", {})]:
        state = build_state(parser.parse_args([str(tiny_model), "--device", "cpu", "--num-kv-blocks", "16", "--generation-config", flag]))
        try:
            assert state.sampling_defaults == expected
        finally:
            state.engine_loop.shutdown()
