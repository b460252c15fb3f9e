"""A compact Llama-family decoder (Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3) over a paged KV cache.

Reads top to bottom like gpt-fast: RMSNorm, RoPE, attention, MLP, decoder layer, causal LM.
Module and parameter names follow transformers, so a Hugging Face ``model.safetensors`` (or a
sharded index) loads by name. The batch is flattened (``[N]`` tokens of many sequences, no
padding); ``AttentionMetadata`` says where each token's KV lives.

Adapters enter at two points only, both through ``AdapterBatch`` (``preft.engine.adapter_manager``):
LoRA adds ``adapters.lora(layer, module, x)`` to a linear module's output, ReFT edits the output
of a decoder layer. When a step has no adapted token the runner passes ``adapters=None`` and no
adapter code runs at all.
"""

from __future__ import annotations

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


class Attention(nn.Module):
    def __init__(self, config: Any, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        bias = bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2"
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bool(getattr(config, "attention_bias", False)))
        self.qk_norm = config.model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.scale = self.head_dim**-0.5

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, kv: tuple[Tensor, Tensor], meta: AttentionMetadata, adapters: AdapterBatch | None
    ) -> Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if adapters is not None:
            q = adapters.lora(self.layer, "q_proj", x, q)
            k = adapters.lora(self.layer, "k_proj", x, k)
            v = adapters.lora(self.layer, "v_proj", x, v)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        write_kv(kv[0], kv[1], k, v, meta.slot_mapping)
        o = paged_attention(q, kv[0], kv[1], meta, self.scale).flatten(1)
        out = self.o_proj(o)
        return adapters.lora(self.layer, "o_proj", o, out) if adapters is not None else out


class MLP(nn.Module):
    def __init__(self, config: Any, layer: int):
        super().__init__()
        self.layer = layer
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: Tensor, adapters: AdapterBatch | None) -> Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if adapters is not None:
            gate = adapters.lora(self.layer, "gate_proj", x, gate)
            up = adapters.lora(self.layer, "up_proj", x, up)
        h = F.silu(gate) * up
        out = self.down_proj(h)
        return adapters.lora(self.layer, "down_proj", h, out) if adapters is not None else out


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


def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device | str) -> CausalLM:
    """Build ``CausalLM`` from ``config.json`` and load its safetensors weights (single file or sharded index).

    Each weight is read once, straight into its final dtype and device: no full-model copy in the
    file's dtype first. On CPU a weight already in the wanted dtype stays a view of the memory-mapped
    file (never written): no copy at all, and its pages are read from the page cache when first used.
    A weight that is converted drops its mapped pages as soon as it is, so peak memory stays near
    the converted model's size.
    """
    model_dir = Path(model_dir)
    config = load_config(model_dir)
    device = torch.device(device)
    with torch.device("meta"):
        model = CausalLM(config)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    if not (model_dir / files[0]).is_file():
        raise PreftError(f"no safetensors weights in {model_dir} (expected model.safetensors or model.safetensors.index.json)")
    page = mmap.PAGESIZE
    state: dict[str, Tensor] = {}
    for file in files:
        region, entries = map_safetensors(model_dir / file)
        for name, (file_dtype, shape, offset) in entries.items():
            if name not in shapes:
                continue  # e.g. a tied lm_head.weight saved anyway
            if shape != tuple(shapes[name]):
                raise PreftError(f"weight {name!r} in {file} has shape {shape}, the config implies {tuple(shapes[name])}")
            numel = math.prod(shape)
            mapped = torch.frombuffer(region, dtype=file_dtype, count=numel, offset=offset).view(shape) if numel else torch.empty(shape)
            if file_dtype == dtype and device.type == "cpu":
                state[name] = mapped
                continue
            state[name] = mapped.to(device=device, dtype=dtype)
            first, last = -(-offset // page) * page, (offset + numel * mapped.element_size()) // page * page
            if last > first and hasattr(mmap, "MADV_DONTNEED"):  # unmodified file pages: dropping them loses nothing
                region.madvise(mmap.MADV_DONTNEED, first, last - first)
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise PreftError(f"{model_dir} lacks weights {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict(state, strict=False, assign=True)  # inv_freq is not in the file (a non-persistent buffer)
    model.requires_grad_(False)
    model.inv_freq = model.inv_freq.to(device)  # RoPE frequencies stay float32 whatever the weights' dtype
    return model.eval()
