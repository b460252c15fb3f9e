"""The decode-graph plumbing (static buffers, batch buckets, scratch rows) on CPU.

Real capture needs CUDA; here a graph "replay" re-runs the forward on the static buffers, and
attention takes the PyTorch path (on the graphs' metadata), so what is checked is everything around
the graph: inputs copied in, padding rows sent to the scratch block, outputs sliced back, and
which graph a step replays (base model, or with `all`-policy adapters), the per-token adapter slot
buffers (padding rows -1), invalidation and lazy recapture when the adapter stacks are reallocated,
and the self-check's eager fallback. Greedy tokens must still equal the reference. The stand-in
replay binds the stacks' tensors at capture, as a real graph binds their addresses, so a stale
graph would compute with stale factors here too.
"""

from __future__ import annotations

import logging
import types

import pytest
import torch
from engine_helpers import VOCAB, adapter_name, assert_matches_reference, full_logprobs

from preft.engine import LLM, SamplingParams
from preft.engine.attention import build_metadata
from preft.engine.cuda_graphs import DecodeGraphs


class ReplayByRerun(DecodeGraphs):
    """Capture without CUDA: a replay recomputes the forward into the captured output tensor.

    The adapter view is bound at capture (a real graph holds the stacks' addresses); every replay
    records its key and (layout version at capture, layout version now).
    """

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.replays: list[tuple[int, bool, bool]] = []
        self.captures: list[tuple[int, bool, bool]] = []
        self.versions: list[tuple[int, int]] = []

    def _record(self, key):
        self.captures.append(key)
        view, version, b = self.views.get(key), self.manager.layout_version, key[0]
        self.outputs[key] = self._forward(key).clone()

        def replay():
            self.replays.append(key)
            if view is not None:
                self.versions.append((version, self.manager.layout_version))
            self.outputs[key].copy_(
                self.model(self.input_ids[:b], self.positions[:b], self.kv_cache, self._meta(b), self._replayed_view(view))
            )

        return types.SimpleNamespace(replay=replay)

    def _replayed_view(self, view):
        return view


class ReplayWithoutAdapters(ReplayByRerun):
    """A broken adapter capture: the graph forgets the adapters. The self-check must catch it."""

    def _replayed_view(self, view):
        return None


def install_graphs(llm, cls=ReplayByRerun):
    runner = llm.engine.runner
    runner.graphs = cls(runner.model, runner.kv_cache, 12, 16, runner.num_blocks, runner.sliding_window, runner.adapters)
    assert runner.graphs.capture()
    runner.graphs.replays.clear()
    runner.graphs.captures.clear()
    return runner.graphs


@pytest.fixture
def graphed_llm(tiny_checkpoint, family_pair):
    _, ref = family_pair("qwen3")
    llm = LLM(tiny_checkpoint("qwen3"), dtype="float32", device="cpu", block_size=4, num_kv_blocks=128, max_num_seqs=12, max_model_len=64)
    install_graphs(llm)
    return llm, ref


def add(llm, ref, *names):
    for name in names:
        llm.add_adapter(name, ref.get_adapter(name))


PROMPTS = [[5 + i, 6, 7, 8, 9][: 2 + i % 4] for i in range(5)]


def test_base_decode_replays_base_graph(graphed_llm):
    llm, ref = graphed_llm
    add(llm, ref, adapter_name("lora_all", "prefill", 4))
    prefill_only = [adapter_name("lora_all", "prefill", 4), None, adapter_name("lora_all", "prefill", 4), None, None]
    assert_matches_reference(llm, ref, PROMPTS, prefill_only, max_tokens=7)
    graphs = llm.engine.runner.graphs
    assert graphs.replays and set(graphs.replays) == {(8, False, False)}  # 5 rows padded up to the bucket of 8
    assert not graphs.captures  # no adapter graph is needed


def test_all_policy_decode_replays_adapter_graphs(graphed_llm):
    """LoRA (some modules, every module) and ReFT with the `all` policy, mixed with PreFT and base rows: decode replays."""
    llm, ref = graphed_llm
    names = [
        adapter_name(k, p, r) for k, p, r in (("lora", "all", 2), ("lora_all", "all", 4), ("direft", "all", 2), ("loreft", "prefill", 4))
    ]
    add(llm, ref, *names)
    graphs = llm.engine.runner.graphs
    adapters = [names[0], names[1], names[2], None, names[3]]
    assert_matches_reference(llm, ref, PROMPTS, adapters, max_tokens=6)
    assert set(graphs.captures) == {(8, True, True)}  # captured lazily, once
    assert graphs.replays.count((8, True, True)) == 1 + 5  # the capture's self-check, then every decode step (tokens 2..6)
    assert (8, False, False) not in graphs.replays
    graphs.replays.clear()
    assert_matches_reference(llm, ref, PROMPTS[:2], [names[2], names[2]], max_tokens=4)  # ReFT only: its own graph
    assert graphs.replays == [(2, False, True)] * (1 + 3)
    assert all(captured == now for captured, now in graphs.versions)


def test_adapter_slot_buffers_and_padding_rows(graphed_llm):
    """``run`` copies the step's slots into the static buffers, padding rows get -1, and the output equals eager."""
    llm, ref = graphed_llm
    a, b = adapter_name("lora", "all", 2), adapter_name("lora_all", "all", 8)
    add(llm, ref, a, b)
    manager, runner = llm.engine.adapters, llm.engine.runner
    graphs = runner.graphs
    sa, sb = manager.acquire(a), manager.acquire(b)
    try:
        with torch.inference_mode():  # as the runner calls it
            n = 5
            lora_slot = torch.tensor([sa, -1, sb, sa, -1])
            batch = manager.batch(lora_slot, {sa, sb}, None, set())
            ids, pos = torch.tensor([7, 8, 9, 10, 11]), torch.zeros(n, dtype=torch.long)
            # Each row on its own free block (the engine is idle); padding rows write the scratch block.
            tables, ctx = torch.arange(n)[:, None], torch.ones(n, dtype=torch.long)
            slots = tables[:, 0] * llm.engine.block_size
            graphs.lora_slot.fill_(3)  # stale values from an earlier step must not survive in padding rows
            hidden = graphs.run(ids, pos, slots, tables, ctx, batch).clone()
            assert graphs.replays[-1] == (8, True, False)
            assert graphs.lora_slot[:n].tolist() == lora_slot.tolist()
            assert graphs.lora_slot[n:8].tolist() == [-1] * 3
            assert graphs.slot_mapping[n:8].tolist() == [graphs.scratch_slot] * 3
            meta = build_metadata(slots, [1] * n, ctx.tolist(), tables.tolist())
            eager = runner.model(ids, pos, runner.kv_cache, meta, manager.batch(lora_slot, {sa, sb}, None, set()))
            base = runner.model(ids, pos, runner.kv_cache, meta, None)
            assert (eager - base).abs().max() > 1e-2  # the adapters matter here
            torch.testing.assert_close(hidden, eager, rtol=1e-5, atol=1e-5)
    finally:
        manager.release(sa)
        manager.release(sb)


def test_layout_version_counts_stack_reallocations(tiny_checkpoint, family_pair):
    _, ref = family_pair("qwen3")
    llm = LLM(tiny_checkpoint("qwen3"), dtype="float32", device="cpu", block_size=4, num_kv_blocks=16, max_adapter_slots=2)
    manager = llm.engine.adapters
    names = [
        adapter_name("lora", "all", 4),
        adapter_name("lora", "prefill", 2),
        adapter_name("lora", "all", 8),
        adapter_name("direft", "all", 2),
    ]
    add(llm, ref, *names)
    v0 = manager.layout_version
    manager.release(manager.acquire(names[0]))  # new q/v/down stacks in both layers
    v1 = manager.layout_version
    assert v1 > v0
    manager.release(manager.acquire(names[1]))  # same modules, smaller rank: writes into the stacks only
    assert manager.layout_version == v1
    manager.release(manager.acquire(names[2]))  # evicts, and rank 8 > 4 widens every stack
    v2 = manager.layout_version
    assert v2 == v1 + 6  # 2 layers x 3 modules grown
    manager.release(manager.acquire(names[3]))  # ReFT stacks: new
    assert manager.layout_version == v2 + 2


def test_stack_growth_invalidates_and_recaptures(graphed_llm):
    """A larger-rank / wider adapter reallocates the stacks: the old adapter graphs are never replayed again."""
    llm, ref = graphed_llm
    small, wide = adapter_name("lora", "all", 2), adapter_name("lora_all", "all", 8)
    add(llm, ref, small, wide)
    graphs, manager = llm.engine.runner.graphs, llm.engine.adapters
    assert_matches_reference(llm, ref, PROMPTS[:3], [small, None, small], max_tokens=4)
    assert graphs.captures == [(4, True, False)]
    old_view, old_version = graphs.views[(4, True, False)], graphs.layout_version
    assert_matches_reference(llm, ref, PROMPTS[:3], [wide, small, None], max_tokens=4)  # new modules, rank 8 > 2
    assert manager.layout_version != old_version
    assert old_view.lora_factors[(0, "q_proj")][0] is not manager.lora_stacks[(0, "q_proj")].down  # the old graph would be stale
    assert graphs.captures == [(4, True, False), (4, True, False)]  # recaptured lazily, once
    assert graphs.views[(4, True, False)] is not old_view
    assert graphs.versions and all(captured == now for captured, now in graphs.versions)  # no replay of a stale graph


def test_failed_adapter_self_check_falls_back_to_eager(tiny_checkpoint, family_pair, caplog):
    _, ref = family_pair("qwen3")
    llm = LLM(tiny_checkpoint("qwen3"), dtype="float32", device="cpu", block_size=4, num_kv_blocks=128, max_num_seqs=12, max_model_len=64)
    graphs = install_graphs(llm, ReplayWithoutAdapters)
    name = adapter_name("lora_all", "all", 4)
    add(llm, ref, name)
    with caplog.at_level(logging.WARNING, logger="preft.engine.cuda_graphs"):
        assert_matches_reference(llm, ref, PROMPTS[:2], [name, None], max_tokens=4)
    assert "all`-policy adapters disabled" in caplog.text and "differs from eager" in caplog.text
    assert not graphs.adapter_graphs and all(not (k[1] or k[2]) for k in graphs.graphs)
    graphs.replays.clear()
    assert_matches_reference(llm, ref, PROMPTS[:2], [None, None], max_tokens=3)
    assert graphs.replays == [(2, False, False)] * 2  # base graphs still in use


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_all_policy_graphs_equal_eager(tiny_checkpoint, family_pair):
    """Real capture: `all`-policy LoRA and ReFT decode replayed from graphs equals the eager engine, also after stack growth."""
    _, ref = family_pair("llama")
    kw = dict(dtype="float32", device="cuda", block_size=16, num_kv_blocks=64, max_num_seqs=8, max_model_len=128)
    graphed = LLM(tiny_checkpoint("llama"), use_cuda_graphs=True, **kw)
    eager = LLM(tiny_checkpoint("llama"), use_cuda_graphs=False, **kw)
    assert graphed.engine.runner.graphs is not None, "base-model graphs failed to capture"
    params = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=VOCAB)
    rounds = [
        [adapter_name("lora", "all", 2), None, adapter_name("direft", "all", 4)],
        [adapter_name("lora_all", "all", 8), adapter_name("lora", "all", 2), adapter_name("loreft", "prefill", 2)],  # grows stacks
    ]
    for adapters in rounds:
        for llm in (graphed, eager):
            add(llm, ref, *[a for a in adapters if a is not None and a not in {i.name for i in llm.list_adapters()}])
        outs = [llm.generate(PROMPTS[:3], params, adapter=adapters, use_tqdm=False) for llm in (graphed, eager)]
        for got, want in zip(*outs):
            assert got.outputs[0].token_ids == want.outputs[0].token_ids
            diff = (full_logprobs(got.outputs[0]) - full_logprobs(want.outputs[0])).abs().max().item()
            assert diff < 1e-3, f"graph vs eager log-prob diff {diff:.2e}"
        graphs = graphed.engine.runner.graphs
        assert graphs.adapter_graphs and any(k[1] or k[2] for k in graphs.graphs), "no adapter graph was captured"
        assert graphs.layout_version == graphed.engine.adapters.layout_version
