"""How much GPU memory the KV pool may take: vLLM's rule, from a profiled worst-case step.

``gpu_memory_utilization`` is the fraction of the *whole* GPU the engine may use. After the
weights are loaded, one step of ``max_num_batched_tokens`` prompt tokens runs with every token
adapted (a LoRA on every linear module and a DiReFT at every layer, of the engine's ``max_lora_rank``,
in ``max_adapter_slots`` slots: the largest the real adapter stacks can grow) and attending to
``max_model_len`` keys; its peak allocation is weights + activations + adapter stacks. The KV
pool gets ``gpu_memory_utilization * total - peak - memory used outside PyTorch`` (CUDA context,
libraries, other processes). ``kv_cache_bytes`` is the pure arithmetic, tested on CPU with fake
numbers; ``profile_cuda_memory`` does the measuring.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from preft.adapters import LoraConfig, ReftConfig
from preft.engine.adapter_manager import AdapterBatch, AdapterManager
from preft.engine.attention import build_metadata
from preft.engine.model import CausalLM, sliding_window
from preft.errors import PreftError
from preft.tiny import random_adapter

# The rank of the profiled adapters when none is given (vLLM's default --max-lora-rank); the engine
# profiles at its own max_lora_rank, the highest rank it accepts, so the slot stacks never outgrow the profile.
PROFILE_ADAPTER_RANK = 16
KERNEL_RANK_BLOCKS = (16, 32, 64)  # the Triton adapter kernels' rank tiles (``kernels.grouped_low_rank``: one compile each)
GiB = 1 << 30


@dataclass
class MemoryProfile:
    """Device memory in bytes, measured after loading the model and running the profiled step."""

    total: int  # the device's memory
    peak_allocated: int  # PyTorch's peak in the profiled step: weights + activations + adapter stacks
    non_torch: int  # used outside PyTorch's allocator: CUDA context, cuBLAS workspaces, other processes
    num_tokens: int  # tokens of the profiled step (for error messages)


def kv_cache_bytes(profile: MemoryProfile, gpu_memory_utilization: float, min_bytes: int = 1) -> int:
    """Bytes the KV pool may take: ``gpu_memory_utilization * total - peak_allocated - non_torch`` (vLLM's rule).

    Raises ``PreftError`` naming the numbers when less than ``min_bytes`` (e.g. one KV block) is left.
    """
    if not 0 < gpu_memory_utilization <= 1:
        raise PreftError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    allowed = int(gpu_memory_utilization * profile.total)
    budget = allowed - profile.peak_allocated - profile.non_torch
    if budget < max(1, min_bytes):
        raise PreftError(
            f"no GPU memory left for the KV cache ({max(budget, 0) / GiB:.2f} GiB, less than one {min_bytes}-byte block): "
            f"gpu_memory_utilization={gpu_memory_utilization} of {profile.total / GiB:.2f} GiB allows {allowed / GiB:.2f} GiB; the weights and a profiled step of "
            f"{profile.num_tokens} tokens peaked at {profile.peak_allocated / GiB:.2f} GiB and "
            f"{profile.non_torch / GiB:.2f} GiB is used outside PyTorch (CUDA context, other processes); "
            "raise gpu_memory_utilization, lower max_num_batched_tokens or max_model_len, or use a smaller model"
        )
    return budget


@dataclass
class ProfileAdapters:
    """Two adapters in slots of a temporary ``AdapterManager`` (see ``profile_adapters``)."""

    manager: AdapterManager
    lora_slot: int
    reft_slot: int

    def bind(self, num_tokens: int) -> AdapterBatch:
        """Every one of ``num_tokens`` tokens adapted by both adapters."""
        device = self.manager.device
        lora = torch.full((num_tokens,), self.lora_slot, dtype=torch.long, device=device)
        reft = torch.full((num_tokens,), self.reft_slot, dtype=torch.long, device=device)
        return self.manager.batch(lora, {self.lora_slot}, reft, {self.reft_slot})


def profile_adapters(model: CausalLM, max_adapter_slots: int, rank: int = PROFILE_ADAPTER_RANK) -> ProfileAdapters:
    """A LoRA on every linear module and a DiReFT at every layer, loaded into a temporary ``AdapterManager`` of
    ``max_adapter_slots`` slots (stacks as large as the engine's would be); dropping the result frees them."""
    param = next(model.parameters())
    manager = AdapterManager(
        model.config, param.device, param.dtype, max(2, max_adapter_slots), max_cpu_adapters=2,
        tensor_parallel=getattr(model, "tensor_parallel", (0, 1)),
    )  # fmt: skip
    manager.add("profile-lora", random_adapter(model.config, LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear")))
    manager.add("profile-reft", random_adapter(model.config, ReftConfig(kind="direft", r=rank)))
    return ProfileAdapters(manager, manager.acquire("profile-lora"), manager.acquire("profile-reft"))


@torch.inference_mode()
def adapted_step(
    model: CausalLM, num_tokens: int, context_len: int, num_logit_rows: int, block_size: int, adapters: ProfileAdapters
) -> int:
    """One step of ``num_tokens`` prompt tokens, each adapted by ``adapters``, in chunks of at most ``context_len``
    tokens that each attend to ``context_len`` keys of a scratch KV cache, then logits and sampling probabilities
    of ``num_logit_rows`` rows. Returns the scratch KV cache's size in bytes."""
    config, param = model.config, next(model.parameters())
    device = param.device
    context_len = max(context_len, 1)
    # Block tables may repeat a block: a chunk reads context_len keys from only as many scratch blocks as its
    # writes need, so a long max_model_len costs no scratch memory (it would not fit next to the weights).
    num_blocks = -(-min(context_len, num_tokens) // block_size)
    table = [i % num_blocks for i in range(-(-context_len // block_size))]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = model.model.layers[0].self_attn.num_kv_heads  # this rank's share under tensor parallelism
    kv_cache = torch.zeros(2, config.num_hidden_layers, num_blocks, block_size, kv_heads, head_dim, dtype=param.dtype, device=device)
    query_lens = [min(context_len, num_tokens - start) for start in range(0, num_tokens, context_len)]
    positions = [p for n in query_lens for p in range(context_len - n, context_len)]
    slots = [table[p // block_size] * block_size + p % block_size for p in positions]
    meta = build_metadata(
        torch.tensor(slots, device=device), query_lens, [context_len] * len(query_lens), [table] * len(query_lens), sliding_window(config)
    )
    ids, positions = torch.zeros(num_tokens, dtype=torch.long, device=device), torch.tensor(positions, device=device)
    hidden = model(ids, positions, kv_cache, meta, adapters.bind(num_tokens))
    logits = model.logits(hidden[: max(1, min(num_logit_rows, num_tokens))])
    logits.softmax(-1).sort(-1, descending=True)  # about what a top-p sampler holds at once
    return kv_cache.numel() * kv_cache.element_size()


def profile_cuda_memory(
    model: CausalLM,
    max_num_batched_tokens: int,
    max_model_len: int,
    max_num_seqs: int,
    block_size: int,
    max_adapter_slots: int,
    max_lora_rank: int = PROFILE_ADAPTER_RANK,
) -> MemoryProfile:
    """Run ``adapted_step`` at the engine's limits on the model's CUDA device and measure (see the module doc); the
    adapter slots are reserved at ``max_lora_rank``, the highest rank the engine accepts."""
    device = next(model.parameters()).device
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    adapters = profile_adapters(model, max_adapter_slots, max_lora_rank)
    scratch = adapted_step(model, max_num_batched_tokens, max_model_len, max_num_seqs, block_size, adapters)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - scratch  # the scratch KV stands in for the pool, sized separately
    free, total = torch.cuda.mem_get_info(device)
    non_torch = max(0, total - free - torch.cuda.memory_reserved(device))
    del adapters
    torch.cuda.empty_cache()
    return MemoryProfile(total=total, peak_allocated=peak, non_torch=non_torch, num_tokens=max_num_batched_tokens)


def kernel_warm_up_ranks(max_lora_rank: int) -> list[int]:
    """Adapter ranks whose steps compile every rank tile of the Triton kernels an engine accepting ``max_lora_rank``
    can use (a rank above the largest tile runs that tile several times: no new compile)."""
    tiles = [r for r in KERNEL_RANK_BLOCKS if r == KERNEL_RANK_BLOCKS[0] or r < 2 * max_lora_rank]
    return [min(r, max_lora_rank) for r in tiles]  # rank 17 uses the 32 tile: no stack wider than the profile reserved
