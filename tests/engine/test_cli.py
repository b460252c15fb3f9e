"""``preft generate``: registers adapters from NAME=PATH[:POLICY] and prints the engine's completions."""

from __future__ import annotations

import json

from engine_helpers import adapter_config

from preft.adapters import save_adapter
from preft.cli import main
from preft.engine import LLM, SamplingParams
from preft.engine.cli import parse_adapter
from preft.tiny import random_adapter


def test_parse_adapter_spec():
    assert parse_adapter("alice=/a/b:prefill") == ("alice", "/a/b", "prefill")
    assert parse_adapter("bob=/x:y/z") == ("bob", "/x:y/z", None)


def test_generate_command_prints_what_the_engine_computes(tiny_checkpoint, family_pair, tmp_path, capsys):
    path = tiny_checkpoint("llama")
    _, ref = family_pair("llama")
    save_adapter(random_adapter(ref.config, adapter_config("lora", "all"), seed=5, std=0.3), tmp_path / "alice")
    code = main(["generate", str(path), "--prompt", "Hi there", "--prompt", "Yo", "--adapter", f"alice={tmp_path / 'alice'}:prefill",
                 "--use", "alice", "--use", "none", "--max-tokens", "5", "--device", "cpu", "--json"])  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    llm = LLM(path, device="cpu", num_kv_blocks=32)
    llm.add_adapter("alice", tmp_path / "alice", policy="prefill")
    expected = llm.generate(["Hi there", "Yo"], SamplingParams(max_tokens=5), adapter=["alice", None], use_tqdm=False)
    assert [r["token_ids"] for r in rows] == [o.outputs[0].token_ids for o in expected]
    assert [r["adapter"] for r in rows] == ["alice", None]


def test_generate_command_reports_bad_input(tiny_checkpoint, capsys):
    code = main(["generate", str(tiny_checkpoint("llama")), "--prompt", "x", "--use", "ghost", "--device", "cpu"])
    assert code == 2
    assert "unknown adapter 'ghost'" in capsys.readouterr().out
