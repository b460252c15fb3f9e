"""``EngineConfig``: one definition of every engine option, the same flags in every CLI, and the engine built from it."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from preft.engine import LLM
from preft.engine.config import EngineConfig, add_engine_arguments
from preft.errors import PreftError

FLAG_FIELDS = [f for f in dataclasses.fields(EngineConfig) if f.metadata.get("cli", True)]


def parse(*argv: str, **kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser, **kw)
    return parser.parse_args(list(argv))


def test_every_option_has_help_and_no_flags_means_the_defaults():
    assert all(f.metadata["help"] for f in dataclasses.fields(EngineConfig))
    assert EngineConfig.from_args(parse()) == EngineConfig()


def test_flags_and_their_aliases_set_the_fields():
    args = parse(
        "--max-loras", "3", "--max-cpu-loras", "5", "--num-kv-blocks", "7", "--kv-cache-memory-bytes", "2GiB",
        "--gpu-memory-utilization", "0.5", "--block-size", "8", "--max-num-seqs", "9", "--max-num-batched-tokens", "99",
        "--no-prefix-caching", "--max-model-len", "128", "--enforce-eager", "--seed", "4", "--dtype", "float32", "--device", "cpu",
    )  # fmt: skip
    assert EngineConfig.from_args(args) == EngineConfig(
        dtype="float32", device="cpu", max_adapter_slots=3, max_cpu_adapters=5, num_kv_blocks=7, kv_cache_memory_bytes="2GiB",
        gpu_memory_utilization=0.5, block_size=8, max_num_seqs=9, max_num_batched_tokens=99, enable_prefix_caching=False,
        max_model_len=128, use_cuda_graphs=False, seed=4,
    )  # fmt: skip
    assert parse("--no-cuda-graphs").use_cuda_graphs is False
    assert parse("--no-enable-prefix-caching").enable_prefix_caching is False


def test_per_cli_defaults_and_exclusions():
    args = parse(defaults={"max_num_seqs": 256}, exclude={"seed"})
    assert args.max_num_seqs == 256 and not hasattr(args, "seed")


@pytest.mark.parametrize("command", ["generate", "serve", "bench"])
def test_every_cli_has_every_engine_flag(command):
    from preft.cli import SUBCOMMANDS

    module = __import__(SUBCOMMANDS[command][0], fromlist=["add_arguments"])
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    flags = {s for a in parser._actions for s in a.option_strings}
    wanted = {"--" + f.name.replace("_", "-") for f in FLAG_FIELDS if f.name not in ("use_cuda_graphs",)} | {"--enforce-eager"}
    if command == "bench":
        wanted -= {"--seed"}  # bench's --seed seeds its workload
    assert wanted <= flags, wanted - flags


def test_an_unknown_option_is_an_error_naming_it():
    with pytest.raises(PreftError, match=r"unknown engine option\(s\) \['max_seqs'\]"):
        EngineConfig.from_kwargs("default", max_seqs=4)


def test_llm_keywords_and_an_engine_config_build_the_same_engine(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    by_keywords = LLM(path, dtype="float32", device="cpu", num_kv_blocks=16, block_size=8, max_num_seqs=4)
    config = EngineConfig(model=str(path), dtype="float32", device="cpu", num_kv_blocks=16, block_size=8, max_num_seqs=4)
    by_config = LLM(config)
    assert by_keywords.engine.engine_config == by_config.engine.engine_config == config
    assert by_config.engine.block_manager.num_blocks == 16 and by_config.engine.scheduler.max_num_seqs == 4
    assert by_config.engine.block_size == 8
