"""The decode-graph plumbing (static buffers, batch buckets, scratch rows) on CPU.

Real capture needs CUDA; here a graph "replay" re-runs the forward on the static buffers, and the
Triton decode kernel is stood in for by a PyTorch one, so what is checked is everything around
the graph: inputs copied in, padding rows sent to the scratch block, outputs sliced back, and
that only adapter-free decode steps replay. Greedy tokens must still equal the reference.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from engine_helpers import adapter_name, assert_matches_reference

import preft.engine.attention as attention
from preft.engine import LLM
from preft.engine.attention import causal_mask
from preft.engine.cuda_graphs import DecodeGraphs


def torch_paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window=None):
    k = k_cache[block_tables].flatten(1, 2)
    v = v_cache[block_tables].flatten(1, 2)
    key_pos = torch.arange(k.shape[1])
    mask = causal_mask((context_lens - 1)[:, None], key_pos[None, :], sliding_window)
    o = F.scaled_dot_product_attention(
        q[:, :, None], k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None], scale=scale, enable_gqa=True
    )
    return o.squeeze(2)


class ReplayByRerun(DecodeGraphs):
    """``capture`` without CUDA: a replay recomputes the forward into the captured output tensor."""

    replays: list[int] = []

    def capture(self) -> bool:
        for b in self.buckets:
            self.outputs[b] = self._forward(b).clone()
            self.graphs[b] = types.SimpleNamespace(replay=lambda b=b: (self.replays.append(b), self.outputs[b].copy_(self._forward(b))))
        return True


@pytest.fixture
def graphed_llm(tiny_checkpoint, family_pair, monkeypatch):
    monkeypatch.setattr(
        attention, "_TRITON_DECODE", [types.SimpleNamespace(paged_decode_attention=torch_paged_decode, supported=lambda bs: True)]
    )
    _, ref = family_pair("qwen3")
    llm = LLM(tiny_checkpoint("qwen3"), dtype="float32", device="cpu", block_size=4, num_kv_blocks=128, max_num_seqs=12, max_model_len=64)
    runner = llm.engine.runner
    runner.decode_kernel = True
    runner.graphs = ReplayByRerun(runner.model, runner.kv_cache, 12, 16, runner.num_blocks, runner.sliding_window)
    runner.graphs.capture()
    ReplayByRerun.replays = []
    return llm, ref


def test_graph_replayed_decode_equals_reference(graphed_llm):
    llm, ref = graphed_llm
    for name in (adapter_name("lora_all", "prefill", 4), adapter_name("lora", "all", 2)):
        llm.add_adapter(name, ref.get_adapter(name))
    prompts = [[5 + i, 6, 7, 8, 9][: 2 + i % 4] for i in range(5)]
    prefill_only = [adapter_name("lora_all", "prefill", 4), None, adapter_name("lora_all", "prefill", 4), None, None]
    assert_matches_reference(llm, ref, prompts, prefill_only, max_tokens=7)
    assert ReplayByRerun.replays and set(ReplayByRerun.replays) <= {8}  # 5 rows padded up to the bucket of 8
    ReplayByRerun.replays = []
    assert_matches_reference(llm, ref, prompts[:3], [adapter_name("lora", "all", 2), None, None], max_tokens=5)
    assert not ReplayByRerun.replays  # an `all` adapter at decode: eager, never a replay
