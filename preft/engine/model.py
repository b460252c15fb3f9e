"""A compact Llama-family decoder (Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3) over a paged KV cache.

Reads top to bottom like gpt-fast: RMSNorm, RoPE, attention, MLP, decoder layer, causal LM.
Module and parameter names follow transformers, so a Hugging Face ``model.safetensors`` (or a
sharded index) loads by name, except that each layer runs one ``qkv_proj`` and one ``gate_up_proj``
matmul (vLLM's fused projections): the loader writes ``q_proj``/``k_proj``/``v_proj`` and
``gate_proj``/``up_proj`` into row ranges of them, and the forward splits their outputs by views.
The batch is flattened (``[N]`` tokens of many sequences, no padding); ``AttentionMetadata`` says
where each token's KV lives.

Adapters enter at two points only, both through ``AdapterBatch`` (``preft.engine.adapter_manager``):
LoRA adds ``adapters.lora(layer, module, x, out)`` to a linear module's output (for a fused
projection: into that module's columns of it, so the maths is PEFT's), ReFT edits the output
of a decoder layer. When a step has no adapted token the runner passes ``adapters=None`` and no
adapter code runs at all.

Tensor parallelism (``preft.engine.parallel.shard_model``) leaves this file's maths alone: a rank's layers hold a
share of the heads and MLP columns, and ``o_proj`` / ``down_proj`` outputs (LoRA deltas included) are all-reduced.
"""

from __future__ import annotations

import itertools
import json
import math
import mmap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig

from preft.adapters import check_family
from preft.engine.attention import AttentionMetadata, paged_attention, write_kv
from preft.errors import PreftError, UnsupportedModelError

if TYPE_CHECKING:
    from preft.engine.adapter_manager import AdapterBatch


def load_config(model_dir: str | Path) -> Any:
    """The model's transformers config (legacy ``rope_scaling`` normalised); unsupported families raise."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise PreftError(f"{model_dir} is not a model directory: {config_path} does not exist")
    raw = json.loads(config_path.read_text())
    check_family(raw)
    return AutoConfig.from_pretrained(model_dir)


def sliding_window(config: Any) -> int | None:
    """Mistral's attention window (every layer), or None; Qwen's per-layer windows are not implemented."""
    if config.model_type == "mistral":
        return getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", False):
        raise UnsupportedModelError(f"{config.model_type} with use_sliding_window=True is not supported; preft runs full attention only")
    return None


def rope_inv_freq(config: Any) -> tuple[Tensor, float]:
    """RoPE inverse frequencies and cos/sin scale for the config's rope type (default, linear, llama3, yarn...)."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise PreftError(f"rope_type {rope_type!r} is not supported; known: default, {', '.join(ROPE_INIT_FUNCTIONS)}")
    return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE on ``x [N, heads, D]`` with ``cos, sin [N, D]``."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def add_lora(adapters: AdapterBatch, layer: int, modules: tuple[str, ...], x: Tensor, outputs: tuple[Tensor, ...]) -> None:
    """Add each module's LoRA delta into its output, a column slice (a view) of a fused projection's output.

    The same maths as separate projections: module ``q_proj``'s delta lands in exactly the columns
    ``q_proj`` would have produced. Every ``grouped_low_rank`` path adds into ``out`` in place.
    """
    for module, out in zip(modules, outputs):
        adapters.lora(layer, module, x, out)


def all_reduce(x: Tensor, group: Any) -> Tensor:
    """Sum a row-parallel layer's partial outputs over the tensor-parallel ranks of ``group`` (``preft.engine.parallel``), in place."""
    group.allreduce([x]).wait()
    return x


class Attention(nn.Module):
    def __init__(self, config: Any, layer: int):
        super().__init__()
        self.layer = layer
        self.tp_group = None  # tensor parallel: this rank holds a share of the heads (preft.engine.parallel.shard_model)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        bias = bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2"
        hidden = config.hidden_size
        # q_proj, k_proj and v_proj as one matmul (rows concatenated at load, see FUSED_PROJECTIONS).
        self.qkv_sizes = [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim]
        self.qkv_proj = nn.Linear(hidden, sum(self.qkv_sizes), bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bool(getattr(config, "attention_bias", False)))
        self.qk_norm = config.model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.scale = self.head_dim**-0.5

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, kv: tuple[Tensor, Tensor], meta: AttentionMetadata, adapters: AdapterBatch | None
    ) -> Tensor:
        q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        if adapters is not None:
            add_lora(adapters, self.layer, ("q_proj", "k_proj", "v_proj"), x, (q, k, v))
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        write_kv(kv[0], kv[1], k, v, meta.slot_mapping)
        o = paged_attention(q, kv[0], kv[1], meta, self.scale).flatten(1)
        out = self.o_proj(o)
        if adapters is not None:  # under tensor parallelism a partial sum too: reduced with the base layer's
            out = adapters.lora(self.layer, "o_proj", o, out)
        return all_reduce(out, self.tp_group) if self.tp_group is not None else out


class MLP(nn.Module):
    def __init__(self, config: Any, layer: int):
        super().__init__()
        self.layer = layer
        self.tp_group = None  # tensor parallel: this rank holds a share of the MLP columns
        bias = bool(getattr(config, "mlp_bias", False))
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=bias)  # gate_proj; up_proj
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: Tensor, adapters: AdapterBatch | None) -> Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        if adapters is not None:
            add_lora(adapters, self.layer, ("gate_proj", "up_proj"), x, (gate, up))
        h = F.silu(gate) * up
        out = self.down_proj(h)
        if adapters is not None:
            out = adapters.lora(self.layer, "down_proj", h, out)
        return all_reduce(out, self.tp_group) if self.tp_group is not None else out


class DecoderLayer(nn.Module):
    def __init__(self, config: Any, layer: int):
        super().__init__()
        self.layer = layer
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config, layer)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, h: Tensor, cos: Tensor, sin: Tensor, kv: tuple[Tensor, Tensor], meta: AttentionMetadata, adapters: AdapterBatch | None
    ) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, kv, meta, adapters)
        h = h + self.mlp(self.post_attention_layernorm(h), adapters)
        # ReFT edits the residual stream: the output of this decoder layer.
        return adapters.reft(self.layer, h) if adapters is not None else h


class DecoderModel(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        # No random init: weights come from the checkpoint (and initialising on the meta device imports torch._dynamo, ~1 s).
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    """The decoder plus LM head; ``forward`` returns final hidden states, ``logits`` projects chosen rows."""

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if not self.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        with torch.device("cpu"):  # real values even when the model is built on the meta device
            inv_freq, self.rope_scale = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(
        self, input_ids: Tensor, positions: Tensor, kv_cache: Tensor, meta: AttentionMetadata, adapters: AdapterBatch | None = None
    ) -> Tensor:
        """``input_ids, positions [N]``; ``kv_cache [2, layers, blocks, block_size, kv_heads, D]`` -> hidden ``[N, hidden]``."""
        h = self.model.embed_tokens(input_ids)
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = (emb.cos() * self.rope_scale).to(h.dtype), (emb.sin() * self.rope_scale).to(h.dtype)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, (kv_cache[0, i], kv_cache[1, i]), meta, adapters)
        return self.model.norm(h)

    def logits(self, hidden: Tensor) -> Tensor:
        weight = self.model.embed_tokens.weight if self.tie_word_embeddings else self.lm_head.weight
        return F.linear(hidden, weight).float()


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def map_safetensors(path: Path) -> tuple[mmap.mmap, dict[str, tuple[torch.dtype, tuple[int, ...], int]]]:
    """Map a safetensors file (copy-on-write, so tensors viewing it are writable but the file never changes);
    returns the mapping and, per tensor, its dtype, shape and byte offset in the mapping."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        region = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise PreftError(f"weight {name!r} in {path.name} has dtype {info['dtype']}; preft reads {', '.join(SAFETENSORS_DTYPES)}")
        entries[name] = (SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + header_len + info["data_offsets"][0])
    return region, entries


# Fused parameters and the checkpoint weights they hold, in row order (the split order of their output).
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# Rows copied per step when a weight changes dtype or device: bounds the host-side temporary of a cast.
COPY_CHUNK_BYTES = 64 << 20


def checkpoint_parts(model: CausalLM) -> dict[str, list[tuple[str, int, int]]]:
    """``parameter name -> [(checkpoint name, first row, end row)]``: where each parameter's rows come from."""
    parts = {}
    for name, param in model.named_parameters():
        module_path, _, leaf = name.rpartition(".")  # e.g. "model.layers.0.self_attn.qkv_proj", "weight"
        parent, _, module = module_path.rpartition(".")
        if module not in FUSED_PROJECTIONS:
            parts[name] = [(name, 0, param.shape[0])]
            continue
        owner = model.get_submodule(parent)
        sizes = owner.qkv_sizes if module == "qkv_proj" else [owner.intermediate_size] * 2
        rows = [0, *itertools.accumulate(sizes)]
        parts[name] = [(f"{parent}.{part}.{leaf}", rows[i], rows[i + 1]) for i, part in enumerate(FUSED_PROJECTIONS[module])]
    return parts


def copy_rows(dest: Tensor, src: Tensor) -> None:
    """``dest.copy_(src)`` in row chunks of ``COPY_CHUNK_BYTES``: a cast or a host-to-device copy never needs a
    temporary of the whole weight (PyTorch casts a host tensor on the host before copying it to the device)."""
    if src.dim() == 0 or src.numel() == 0:
        dest.copy_(src)
        return
    step = max(1, COPY_CHUNK_BYTES // (src[0].numel() * src.element_size()))
    for first in range(0, len(src), step):
        dest[first : first + step].copy_(src[first : first + step])


class CheckpointFiles:
    """The safetensors files of a model, memory-mapped; a weight is read by name, as a view of its file."""

    def __init__(self, model_dir: Path):
        index = model_dir / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
        if not (model_dir / files[0]).is_file():
            raise PreftError(f"no safetensors weights in {model_dir} (expected model.safetensors or model.safetensors.index.json)")
        self.entries: dict[str, tuple[str, mmap.mmap, torch.dtype, tuple[int, ...], int]] = {}
        for file in files:
            region, entries = map_safetensors(model_dir / file)
            for name, (dtype, shape, offset) in entries.items():
                self.entries[name] = (file, region, dtype, shape, offset)

    def view(self, name: str) -> Tensor:
        _, region, dtype, shape, offset = self.entries[name]
        numel = math.prod(shape)
        return torch.frombuffer(region, dtype=dtype, count=numel, offset=offset).view(shape) if numel else torch.empty(shape, dtype=dtype)

    def adjacent_view(self, names: list[str]) -> Tensor | None:
        """The weights ``names`` as one view of their file when they are stored back to back in this order, else None."""
        first = self.entries[names[0]]
        end = first[4]
        for name in names:
            file, _, dtype, shape, offset = self.entries[name]
            if file != first[0] or dtype != first[2] or offset != end or shape[1:] != first[3][1:]:
                return None
            end = offset + math.prod(shape) * dtype.itemsize
        rows = sum(self.entries[name][3][0] for name in names)
        numel = (end - first[4]) // first[2].itemsize
        return torch.frombuffer(first[1], dtype=first[2], count=numel, offset=first[4]).view(rows, *first[3][1:])

    def release(self, name: str) -> None:
        """Drop the file pages of weight ``name`` from this process (unmodified file pages: nothing is lost)."""
        _, region, dtype, shape, offset = self.entries[name]
        page = mmap.PAGESIZE
        first, last = -(-offset // page) * page, (offset + math.prod(shape) * dtype.itemsize) // page * page
        if last > first and hasattr(mmap, "MADV_DONTNEED"):
            region.madvise(mmap.MADV_DONTNEED, first, last - first)


def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device | str) -> CausalLM:
    """Build ``CausalLM`` from ``config.json`` and load its safetensors weights (single file or sharded index).

    Each weight is read once, from its memory-mapped file straight into its final dtype and device,
    in chunks of at most ``COPY_CHUNK_BYTES``: never a whole-model copy in the file's dtype, and
    never a weight in the file's dtype on the device (a cast happens on the host, chunk by chunk).
    ``q_proj``/``k_proj``/``v_proj`` and ``gate_proj``/``up_proj`` are written into the rows of one
    fused weight each (``FUSED_PROJECTIONS``).

    On CPU a weight already in the wanted dtype stays a view of the memory-mapped file (never
    written): no copy at all, and its pages are read from the page cache when first used. A fused
    weight is such a view too when its parts lie back to back in the file (``gate_proj`` then
    ``up_proj``: the usual alphabetical layout). A weight that is copied drops its mapped pages as
    soon as it is, so peak memory stays near the loaded model's size.
    """
    model_dir = Path(model_dir)
    config = load_config(model_dir)
    device = torch.device(device)
    with torch.device("meta"):
        model = CausalLM(config)
    files = CheckpointFiles(model_dir)
    parts = checkpoint_parts(model)
    wanted = {part for sources in parts.values() for part, _, _ in sources}
    missing = sorted(wanted - set(files.entries))
    if missing:
        raise PreftError(f"{model_dir} lacks weights {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    state: dict[str, Tensor] = {}
    for name, param in model.named_parameters():
        sources = parts[name]
        for part, first, end in sources:
            shape = files.entries[part][3]
            expected = (end - first, *param.shape[1:])
            if shape != expected:
                raise PreftError(f"weight {part!r} in {files.entries[part][0]} has shape {shape}, the config implies {expected}")
        if device.type == "cpu" and all(files.entries[part][2] == dtype for part, _, _ in sources):
            view = files.adjacent_view([part for part, _, _ in sources])
            if view is not None:  # no copy: pages are read from the file when first used
                state[name] = view
                continue
        state[name] = torch.empty(param.shape, dtype=dtype, device=device)
        for part, first, end in sources:
            copy_rows(state[name][first:end], files.view(part))
            files.release(part)
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)
    model.inv_freq = model.inv_freq.to(device)  # RoPE frequencies stay float32 whatever the weights' dtype
    return model.eval()
