"""Tiny random checkpoints of every supported family, written as real Hugging Face directories.

Used by the test suite, the demo and benchmarks: no download is ever needed. The tokenizer is a
byte-level BPE without merges (every byte is a token) plus chat special tokens, built with the
``tokenizers`` library, with a ChatML chat template.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_SHAPE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512
)
FAMILY_OVERRIDES = {
    "llama": dict(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        }
    ),
    "mistral": dict(sliding_window=None),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(head_dim=32),
}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: ids 0-4 are special tokens, ids 5-260 are the 256 bytes."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>", additional_special_tokens=SPECIAL_TOKENS[3:]
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_checkpoint(path: str | Path, family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """Write a tiny random ``family`` checkpoint (config, safetensors, tokenizer) to ``path``."""
    path = Path(path)
    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    fields = {**TINY_SHAPE, **FAMILY_OVERRIDES.get(family, {}), **overrides}
    fields.setdefault("tie_word_embeddings", False)
    config = AutoConfig.for_model(
        family,
        vocab_size=vocab,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **fields,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random init with std 0.02 gives near-uniform logits; larger weights make greedy choices distinct.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def random_adapter(model_config, config, seed: int = 0, std: float = 0.1):
    """An ``Adapter`` with random, clearly non-trivial weights that fit ``model_config``.

    For tests and benchmarks: LoRA gets a non-zero B (a fresh LoRA would be the identity);
    LoReFT's R gets orthonormal rows.
    """
    from preft.adapters import Adapter, LoraConfig, fingerprint, linear_shapes, lora_key, reft_key

    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen) * std  # noqa: E731
    n_layers, hidden, r = model_config.num_hidden_layers, model_config.hidden_size, config.r
    layers = config.layers if config.layers is not None else range(n_layers)
    tensors = {}
    if isinstance(config, LoraConfig):
        shapes = linear_shapes(model_config)
        for layer in layers:
            for module in config.modules():
                fan_in, fan_out = shapes[module]
                tensors[lora_key(layer, module, "A")] = randn(r, fan_in)
                tensors[lora_key(layer, module, "B")] = randn(fan_out, r)
    else:
        for layer in layers:
            tensors[reft_key(layer, "source.weight")] = randn(r, hidden)
            tensors[reft_key(layer, "source.bias")] = randn(r)
            if config.kind == "loreft":
                q, _ = torch.linalg.qr(torch.randn(hidden, r, generator=gen))
                tensors[reft_key(layer, "rotate")] = q.t().contiguous()
            else:
                tensors[reft_key(layer, "proj")] = randn(r, hidden)
    return Adapter(config, tensors, fingerprint(model_config))
