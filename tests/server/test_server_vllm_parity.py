"""vLLM parity of ``preft serve``: its flags (aliases of preft's) and the ``/tokenize``, ``/detokenize``, ``/version`` routes."""

from __future__ import annotations

import argparse
import json

import httpx
import pytest
from server_helpers import ServerThread

import preft
from preft.engine import LLM
from preft.server.cli import add_arguments, build_state, run

API_KEY = "sk-parity"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_vllm_flags_are_aliases_of_preft_flags_and_defaults_are_unchanged():
    defaults = parse()
    assert (defaults.max_adapter_slots, defaults.max_cpu_adapters, defaults.enable_prefix_caching) == (8, 64, True)
    assert (defaults.max_lora_rank, defaults.seed, defaults.tensor_parallel_size, defaults.lora_modules) == (64, None, 1, [])
    assert parse("--max-loras", "3").max_adapter_slots == 3 == parse("--max-adapter-slots", "3").max_adapter_slots
    assert parse("--max-cpu-loras", "5").max_cpu_adapters == 5 == parse("--max-cpu-adapters", "5").max_cpu_adapters
    assert parse("--enable-lora").enable_lora is True
    assert parse("--max-lora-rank", "16").max_lora_rank == 16
    assert parse("--seed", "7").seed == 7
    assert parse("--tensor-parallel-size", "2").tensor_parallel_size == 2
    assert parse("--no-enable-prefix-caching").enable_prefix_caching is False
    assert parse("--no-prefix-caching").enable_prefix_caching is False
    assert parse("--enable-prefix-caching").enable_prefix_caching is True
    assert parse().async_scheduling is None  # auto: on for CUDA with one rank
    assert parse("--async-scheduling").async_scheduling is True and parse("--no-async-scheduling").async_scheduling is False


def test_start_up_summary_names_the_rank_limit_and_the_scheduling_mode(tiny_model):
    from preft.server.cli import summary

    args = parse(str(tiny_model), "--device", "cpu", "--num-kv-blocks", "16", "--max-lora-rank", "8", "--async-scheduling")
    state = build_state(args)
    try:
        assert state.engine_loop.llm.engine.async_scheduling is True  # asked for: honoured on CPU too
        assert "adapter ranks up to 8; asynchronous scheduling on" in summary(state, args)
    finally:
        state.engine_loop.shutdown()


def test_lora_modules_takes_name_path_items_and_the_json_form_with_optional_policy():
    args = parse(
        "--lora-modules",
        "a=/x/a",
        "b=/x/b:all",
        json.dumps({"name": "c", "path": "/x/c", "base_model_name": "m"}),
        json.dumps({"name": "d", "path": "/x/d", "policy": "prefill"}),
        "--adapter",
        "e=/x/e",
    )
    assert args.lora_modules == [("a", "/x/a", None), ("b", "/x/b", "all"), ("c", "/x/c", None), ("d", "/x/d", "prefill")]
    assert args.adapter == ["e=/x/e"]
    assert parse("--lora-modules", "a=/x/a", "--lora-modules", "b=/x/b").lora_modules == [("a", "/x/a", None), ("b", "/x/b", None)]


@pytest.mark.parametrize("bad", ["/no/name", '{"name": "a"}', '{"name": "a", "path": "p", "policy": "x"}', "{not json"])
def test_bad_lora_modules_item_is_a_usage_error_naming_it(bad, capsys):
    with pytest.raises(SystemExit):
        parse("--lora-modules", bad)
    assert "--lora-modules" in capsys.readouterr().err


def test_tensor_parallel_size_that_does_not_divide_the_heads_exits_with_a_clear_error(tiny_model, capsys):
    assert run(parse(str(tiny_model), "--tensor-parallel-size", "3", "--device", "cpu")) == 2
    assert "tensor_parallel_size 3 does not divide the model's 4 attention heads, 2 KV heads" in capsys.readouterr().err


def test_start_up_refuses_an_adapter_above_max_lora_rank(tiny_model, adapter_root):
    args = parse(str(tiny_model), "--lora-modules", f"lora-p={adapter_root / 'lora-p'}", "--max-lora-rank", "3", "--device", "cpu")
    with pytest.raises(ValueError, match=r"adapter 'lora-p' has rank 4 > --max-lora-rank 3"):
        build_state(args)


@pytest.fixture(scope="module")
def server(tiny_model, adapter_root):
    llm = LLM(tiny_model, dtype="float32", device="cpu", num_kv_blocks=64, block_size=8, max_adapter_slots=2, max_cpu_adapters=4)
    server = ServerThread(llm, api_key=API_KEY, adapter_root=adapter_root)
    server.state.max_lora_rank = 3
    yield server
    server.stop()


def post(server, route, body, key=API_KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + route, json=body, headers=headers, timeout=60)


def test_runtime_load_above_max_lora_rank_is_400_and_one_within_it_loads(server):
    refused = post(server, "/v1/load_lora_adapter", {"lora_name": "big", "lora_path": "lora-p"})
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == "adapter 'big' has rank 4 > --max-lora-rank 3"
    assert "big" not in server.engine_loop.adapters()
    loaded = post(server, "/v1/load_lora_adapter", {"lora_name": "small", "lora_path": "many-00"})  # rank 2
    assert loaded.status_code == 200 and loaded.json()["rank"] == 2


def test_tokenize_prompt_and_messages_count_the_tokenizers_tokens(server):
    tokenizer, model = server.state.tokenizer, server.state.model_name
    out = post(server, "/tokenize", {"model": model, "prompt": "The quick brown fox"}).json()
    assert out["tokens"] == tokenizer.encode("The quick brown fox") and out["count"] == len(out["tokens"])
    assert out["max_model_len"] == server.state.max_model_len
    messages = [{"role": "user", "content": "Hello there"}]
    chat = post(server, "/tokenize", {"model": model, "messages": messages, "add_generation_prompt": True}).json()
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == tokenizer.encode(text, add_special_tokens=False) and chat["count"] == len(chat["tokens"])


def test_detokenize_round_trips_tokenize(server):
    prompt = "Hello, wörld! 你好"
    tokens = post(server, "/tokenize", {"prompt": prompt, "add_special_tokens": False}).json()["tokens"]
    assert post(server, "/detokenize", {"model": server.state.model_name, "tokens": tokens}).json() == {"prompt": prompt}


def test_tokenize_errors_are_openai_errors_and_need_the_api_key(server):
    cases = [
        ("/tokenize", {}, 400),  # neither prompt nor messages
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400),
        ("/tokenize", {"model": "nope", "prompt": "a"}, 404),
        ("/detokenize", {"tokens": [-1]}, 400),
        ("/detokenize", {"tokens": "abc"}, 400),
    ]
    for route, body, status in cases:
        response = post(server, route, body)
        assert response.status_code == status, (route, body, response.text)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert post(server, "/tokenize", {"prompt": "a"}, key=None).status_code == 401
    assert post(server, "/detokenize", {"tokens": [1]}, key="wrong").status_code == 401


def test_version_is_open_and_reports_preft_version(server):
    response = httpx.get(server.url + "/version", timeout=30)
    assert response.status_code == 200 and response.json() == {"version": preft.__version__}
