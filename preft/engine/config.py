"""``EngineConfig``: every engine option, defined once, with its default and help text.

``preft generate``, ``preft serve``, ``preft bench``, the GRPO rollout engine, ``LLMEngine(config)`` and
``LLM(model, **options)`` all read their engine options from here. ``add_engine_arguments`` turns the
fields into argparse flags (vLLM's dashed names, plus the aliases the CLIs always accepted) and
``EngineConfig.from_args`` builds the config back from the parsed namespace.

To add an option: add one field with ``metadata=option("help", ...)``; every CLI then has its flag.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from preft.errors import PreftError

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def option(help: str, *flags: str, metavar: str | None = None, choices: tuple | None = None, cli: bool = True) -> dict:
    """Field metadata: help text, extra flag aliases (the dashed field name is always a flag), metavar, choices.

    ``cli=False``: a Python-only option (no flag).
    """
    return {"help": help, "flags": flags, "metavar": metavar, "choices": choices, "cli": cli}


@dataclass
class EngineConfig:
    """The serving engine's options (see the module doc). Field names are ``LLMEngine``'s keyword arguments."""

    model: str = field(
        default="default",
        metadata=option(
            "Hugging Face model folder (config.json, *.safetensors, tokenizer), a .gguf file, or 'default' (SmolLM2-135M-Instruct)",
            cli=False,  # each CLI has its own positional MODEL_DIR
        ),
    )
    dtype: str = field(
        default="auto",
        metadata=option("weights and activations dtype (auto: the checkpoint's; float16 becomes float32 on CPU)", choices=DTYPE_CHOICES),
    )
    device: str | None = field(default=None, metadata=option("cuda, cuda:1, cpu (default: cuda if available)"))
    max_adapter_slots: int = field(default=8, metadata=option("adapters resident on the device at once", "--max-loras"))
    max_lora_rank: int = field(
        default=64,
        metadata=option(
            "the highest adapter rank (LoRA r, ReFT r) accepted, at start and on runtime loads; the KV-cache profile reserves "
            "--max-loras adapter slots of this rank and the CUDA warm-up compiles the adapter kernels up to it (vLLM's default: 16)",
            metavar="N",
        ),
    )
    max_cpu_adapters: int = field(default=64, metadata=option("adapters kept in host memory (LRU)", "--max-cpu-loras"))
    max_cpu_adapter_bytes: int | str = field(
        default="4GiB",
        metadata=option(
            "host memory the adapter cache may hold, in bytes or with a unit (512MiB, 4GiB); the least recently used adapters "
            "beyond it (or beyond --max-cpu-adapters) leave host memory and are re-read from disk when needed",
            "--max-cpu-lora-bytes",
            metavar="SIZE",
        ),
    )
    num_kv_blocks: int | None = field(default=None, metadata=option("KV-cache blocks (overrides --kv-cache-memory-bytes)"))
    kv_cache_memory_bytes: int | str | None = field(
        default=None,
        metadata=option(
            "KV cache size, in bytes or with a unit (512MiB, 2GiB, 3GB); default on CPU: room for --max-num-seqs sequences of "
            "--max-model-len tokens, at most 2 GiB (pages become resident only when used); on CUDA: from --gpu-memory-utilization",
            metavar="SIZE",
        ),
    )
    gpu_memory_utilization: float = field(default=0.9, metadata=option("fraction of GPU memory the engine may use (weights + KV cache)"))
    block_size: int = field(default=16, metadata=option("tokens per KV-cache block"))
    max_num_seqs: int = field(default=64, metadata=option("sequences in one batch at most"))
    max_num_batched_tokens: int = field(default=2048, metadata=option("tokens in one step at most (prefill chunks + decodes)"))
    enable_prefix_caching: bool = field(
        default=True, metadata=option("reuse the KV of shared prompt prefixes (same adapter and mask only) (default: on)")
    )
    max_model_len: int | None = field(default=None, metadata=option("context length (default: the model's)"))
    use_cuda_graphs: bool = field(default=True, metadata=option("replay decode steps as CUDA graphs (--enforce-eager: off)"))
    async_scheduling: bool | None = field(
        default=None,
        metadata=option(
            "schedule and launch step t+1 while the device runs step t; the next input tokens are read on the device and "
            "stop checks land one step late (default: on for CUDA with one rank, off on CPU, where nothing overlaps)"
        ),
    )
    seed: int | None = field(default=None, metadata=option("seed torch's global RNG at start (a request's own 'seed' still wins)"))
    tensor_parallel_size: int = field(
        default=1,
        metadata=option(
            "ranks (GPUs, or CPU processes with gloo) the model is sharded over, Megatron-style; this process is rank 0, the "
            "others are worker processes it starts (see docs/tensor_parallel.md)",
            "-tp",
            metavar="N",
        ),
    )

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_kwargs(cls, model: Any = None, **options: Any) -> EngineConfig:
        """``EngineConfig`` from keyword options; an unknown one is a ``PreftError`` naming it and the known ones."""
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise PreftError(f"unknown engine option(s) {unknown}; known: {sorted(f.name for f in dataclasses.fields(cls))}")
        if model is not None:
            options["model"] = str(model) if not isinstance(model, str) else model
        return cls(**options)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> EngineConfig:
        """The config from parsed flags (``add_engine_arguments``); fields without a flag keep their default unless overridden."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        if hasattr(args, "enforce_eager") and args.enforce_eager:
            values["use_cuda_graphs"] = False
        if getattr(args, "model_dir", None) is not None:
            values["model"] = str(args.model_dir)
        return cls(**{**values, **overrides})


def add_engine_arguments(
    parser: argparse.ArgumentParser | Any,
    exclude: set[str] | frozenset[str] = frozenset(),
    defaults: dict[str, Any] | None = None,
    group: str | None = "engine",
) -> None:
    """Add one flag per ``EngineConfig`` field (``--max-num-seqs`` for ``max_num_seqs``) plus its aliases.

    ``exclude``: fields a CLI defines itself (e.g. ``seed`` where it means something else); ``defaults``:
    per-CLI defaults (e.g. the benchmark's batch sizes); ``group``: an argparse group title, or None.
    """
    target = parser.add_argument_group(group) if group else parser
    defaults = defaults or {}
    for f in dataclasses.fields(EngineConfig):
        meta = f.metadata
        if not meta.get("cli", True) or f.name in exclude:
            continue
        default = defaults.get(f.name, f.default)
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": meta["help"]}
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if meta.get("choices"):
            kwargs["choices"] = list(meta["choices"])
        if f.name == "enable_prefix_caching":
            target.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            target.add_argument("--no-prefix-caching", dest=f.name, action="store_false", help="= --no-enable-prefix-caching")
            continue
        if f.name == "async_scheduling":
            target.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if f.name == "use_cuda_graphs":
            target.add_argument(
                "--enforce-eager", dest=f.name, action="store_false", default=default, help="no CUDA graphs (vLLM's flag name)"
            )
            target.add_argument("--no-cuda-graphs", dest=f.name, action="store_false", help="= --enforce-eager")
            continue
        kind = _arg_type(f)
        if kind is not None:
            kwargs["type"] = kind
        target.add_argument(flag, *meta.get("flags", ()), **kwargs)


def _arg_type(f: dataclasses.Field):
    """argparse type of a field: int/float from the annotation; strings (and sizes like ``2GiB``) stay strings."""
    annotation = str(f.type)
    if annotation.startswith("int |") and "str" not in annotation or annotation == "int":
        return int
    if annotation.startswith("float"):
        return float
    return None
