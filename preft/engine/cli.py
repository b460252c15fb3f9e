"""``preft generate MODEL_DIR --prompt ... [--adapter NAME=PATH[:POLICY]]``: offline generation with the engine."""

from __future__ import annotations

import argparse
import json

from preft.engine.config import EngineConfig, add_engine_arguments
from preft.errors import PreftError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model_dir",
        help="Hugging Face model folder (config.json, *.safetensors, tokenizer), a .gguf file, or 'default' (SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH[:POLICY]", help="register an adapter (repeatable)")
    parser.add_argument(
        "--use",
        action="append",
        default=None,
        metavar="NAME",
        help="adapter per prompt (repeat once per prompt, 'none' for base); default: the only adapter given, else none",
    )
    parser.add_argument("--chat", action="store_true", help="wrap each prompt as a user message with the tokenizer's chat template")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    add_engine_arguments(parser)  # --seed is also each prompt's sampling seed


def parse_adapter(spec: str) -> tuple[str, str, str | None]:
    """``NAME=PATH[:POLICY]`` -> (name, path, policy or None)."""
    if "=" not in spec:
        raise PreftError(f"--adapter must look like NAME=PATH[:POLICY], got {spec!r}")
    name, rest = spec.split("=", 1)
    path, policy = rest, None
    if rest.rsplit(":", 1)[-1] in ("prefill", "all"):
        path, policy = rest.rsplit(":", 1)
    return name, path, policy


def run(args: argparse.Namespace) -> int:
    from preft.engine import LLM, SamplingParams

    try:
        llm = LLM(EngineConfig.from_args(args))
        names = []
        for spec in args.adapter:
            name, path, policy = parse_adapter(spec)
            llm.add_adapter(name, path, policy)
            names.append(name)
        if args.use is not None:
            if len(args.use) != len(args.prompt):
                raise PreftError(f"--use given {len(args.use)} times for {len(args.prompt)} prompts; give it once per prompt")
            adapters = [None if u == "none" else u for u in args.use]
        else:
            adapters = [names[0] if len(names) == 1 else None] * len(args.prompt)
        prompts = args.prompt
        if args.chat:
            prompts = [
                llm.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                for p in prompts
            ]
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop
        )
        outputs = llm.generate(prompts, params, adapter=adapters, use_tqdm=len(prompts) > 1)
    except PreftError as e:
        print(f"error: {e}")
        return 2
    for prompt, adapter, out in zip(args.prompt, adapters, outputs):
        c = out.outputs[0]
        if args.json:
            print(
                json.dumps(
                    {"prompt": prompt, "adapter": adapter, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
                )
            )
        else:
            print(f"[{adapter or 'base'}] {prompt!r} -> {c.text!r} ({c.finish_reason})")
    return 0
