"""``preft serve``: the OpenAI-compatible server.

Imports nothing heavy at module level: ``preft --help`` and the other subcommands must not
need FastAPI, uvicorn or torch to start.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from preft.server.limits import ServerLimits

logger = logging.getLogger("preft.server")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model_dir",
        nargs="?",
        default=None,
        metavar="MODEL_DIR",
        help="Hugging Face model folder or .gguf file (default: the built-in SmolLM2-135M-Instruct and its demo adapters)",
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH[:POLICY]",
        help="adapter to serve as model NAME; POLICY 'prefill' or 'all' overrides the recorded one (repeatable)",
    )
    lora = parser.add_argument_group("vLLM LoRA flags (docs/server.md: vLLM flag -> preft)")
    lora.add_argument("--enable-lora", action="store_true", help="accepted for vLLM compatibility: preft always serves adapters")
    lora.add_argument(
        "--lora-modules",
        nargs="+",
        action="extend",
        type=parse_lora_module,
        default=[],
        metavar="MODULE",
        help='vLLM\'s form of --adapter (give MODEL_DIR before it): each MODULE is NAME=PATH[:POLICY] or \'{"name": ..., "path": ..., "base_model_name": ..., "policy": ...}\'',
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        default=os.environ.get("PREFT_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 routes, /tokenize and /detokenize (default: $PREFT_API_KEY)",
    )
    parser.add_argument(
        "--adapter-root", type=Path, default=None, help="directory runtime adapter loads may read from (default: runtime loading disabled)"
    )
    parser.add_argument("--served-model-name", default=None, help="name of the base model in the API (default: the model directory's name)")
    parser.add_argument(
        "--generation-config",
        default="auto",
        metavar="auto|vllm|PATH",
        help="sampling defaults for knobs a request leaves out (temperature, top_p, top_k, min_p, repetition_penalty), as vLLM: "
        "'auto' the model's generation_config.json, 'vllm' none (OpenAI/vLLM defaults), or a folder holding a generation_config.json",
    )
    parser.add_argument("--no-default-adapters", action="store_true", help="with no MODEL_DIR, do not load the built-in demo adapters")
    parser.add_argument(
        "--protect-startup-adapters", action="store_true", help="adapters given at start-up cannot be unloaded through the API (403)"
    )
    parser.add_argument(
        "--shutdown-grace-seconds",
        type=float,
        default=10.0,
        metavar="S",
        help="on SIGTERM/SIGINT: stop accepting, let running requests finish for up to S seconds, then end each with an error "
        "(a stream gets an error chunk and [DONE])",
    )
    ServerLimits.add_arguments(parser)
    from preft.engine.config import add_engine_arguments

    add_engine_arguments(parser)  # every engine option, one definition (preft.engine.config.EngineConfig)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def parse_adapter_flag(flag: str) -> tuple[str, str, str | None]:
    """``NAME=PATH[:POLICY]`` -> (name, path, policy or None)."""
    name, sep, rest = flag.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--adapter {flag!r} must look like NAME=PATH or NAME=PATH:POLICY (POLICY: prefill or all)")
    path, policy = rest, None
    head, colon, tail = rest.rpartition(":")
    if colon and tail in ("prefill", "all"):
        path, policy = head, tail
    return name, path, policy


def parse_lora_module(item: str) -> tuple[str, str, str | None]:
    """vLLM's ``--lora-modules`` item, ``NAME=PATH[:POLICY]`` or its JSON form -> (name, path, policy or None)."""
    try:
        if not item.lstrip().startswith("{"):
            return parse_adapter_flag(item)
        try:
            module = json.loads(item)
        except json.JSONDecodeError as e:
            raise ValueError(f"--lora-modules {item!r} is not valid JSON: {e}") from None
        if not isinstance(module, dict) or not isinstance(module.get("name"), str) or not isinstance(module.get("path"), str):
            raise ValueError(f'--lora-modules {item!r} must be a JSON object with string "name" and "path"')
        unknown = set(module) - {"name", "path", "base_model_name", "policy"}
        if unknown:
            raise ValueError(f"--lora-modules {item!r} has unknown key(s) {sorted(unknown)}; allowed: name, path, base_model_name, policy")
        policy = module.get("policy")
        if policy not in (None, "prefill", "all"):
            raise ValueError(f"--lora-modules {item!r}: policy must be 'prefill' or 'all', got {policy!r}")
        return module["name"], module["path"], policy
    except ValueError as e:  # argparse shows an ArgumentTypeError's message, a ValueError's only as 'invalid value'
        raise argparse.ArgumentTypeError(str(e)) from None


def check_adapter_rank(name: str, path: str, policy: str | None, max_rank: int | None, flag: str = "--max-lora-rank") -> None:
    """Raise ``ValueError`` if the adapter at ``path`` has a rank above ``max_rank`` (``None``: no limit).

    An adapter that cannot be read passes: loading it reports that error in its own words.
    """
    if max_rank is None:
        return
    from preft.adapters import load_adapter
    from preft.errors import PreftError

    try:
        rank = load_adapter(path, policy=policy).config.r
    except (PreftError, OSError):
        return
    if rank > max_rank:
        raise ValueError(f"adapter {name!r} has rank {rank} > {flag} {max_rank}")


def build_state(args: argparse.Namespace):
    """Load the model and startup adapters; return the ``ServerState`` (engine thread started)."""
    from preft.engine import LLM
    from preft.engine.config import EngineConfig
    from preft.engine.sampler import generation_defaults
    from preft.server.app import ServerState
    from preft.server.default_model import default_model
    from preft.server.engine_loop import EngineLoop
    from preft.server.metrics import Metrics

    adapters: dict[str, tuple[str, str | None]] = {}
    default_name = None
    if args.model_dir is None:
        default = default_model()
        model_dir, default_name = default.model_dir, default.name
        logger.info("no MODEL_DIR given: serving %s", default.description)
        if not args.no_default_adapters:
            adapters.update({name: (str(path), policy) for name, (path, policy) in default.adapters.items()})
    else:
        model_dir = Path(args.model_dir)
    for flag in args.adapter:
        name, path, policy = parse_adapter_flag(flag)
        adapters[name] = (path, policy)
    for name, path, policy in args.lora_modules:
        adapters[name] = (path, policy)
    for name, (path, policy) in adapters.items():  # before the model loads: a refused adapter should fail fast
        check_adapter_rank(name, path, policy, args.max_lora_rank)
    llm = LLM(EngineConfig.from_args(args, model=str(model_dir)))  # --seed seeds torch's global RNG as the engine starts
    model_name = args.served_model_name or default_name or args.model_dir
    for name, (path, policy) in adapters.items():
        if name == model_name:
            raise ValueError(f"--adapter name {name!r} is the base model's name; choose another")
        info = llm.add_adapter(name, path, policy=policy)
        logger.info("loaded adapter %r: %s rank %d, policy %s, from %s", name, info.kind, info.rank, info.policy, path)
    engine_loop = EngineLoop(llm, metrics=Metrics(model_name))  # vLLM's model_name label: the served id, never a host path
    engine_loop.start()
    sampling_defaults = generation_defaults(args.generation_config, llm.engine.model_dir)
    if sampling_defaults:
        logger.info("sampling defaults from generation_config.json (--generation-config %s): %s", args.generation_config, sampling_defaults)
    state = ServerState(
        engine_loop=engine_loop,
        tokenizer=llm.tokenizer,
        model_name=model_name,
        max_model_len=llm.max_model_len,
        model_dir=str(model_dir),
        api_key=args.api_key,
        adapter_root=args.adapter_root,
        max_lora_rank=args.max_lora_rank,
        limits=ServerLimits.from_args(args),
        protected_adapters=frozenset(adapters) if args.protect_startup_adapters else frozenset(),
        sampling_defaults=sampling_defaults,
    )
    return state


def summary(state, args: argparse.Namespace) -> str:
    """The start-up summary a person reads: what is served, where, and with what capacity."""
    llm = state.engine_loop.llm
    stats = state.engine_loop.stats_snapshot
    block_size = getattr(llm.engine, "block_size", args.block_size)
    kv_blocks = stats.get("kv_blocks_total", "?")
    kv_tokens = kv_blocks * block_size if isinstance(kv_blocks, int) else "?"
    lines = [
        f"preft serve: model {state.model_name!r} from {state.model_dir}",
        f"  dtype {str(getattr(llm.engine, 'dtype', args.dtype)).replace('torch.', '')}, device {getattr(llm.engine, 'device', args.device or 'auto')}, context {state.max_model_len} tokens",
        f"  KV cache: {kv_blocks} blocks x {block_size} tokens = {kv_tokens} tokens; adapter slots {stats.get('adapter_slots_total', args.max_adapter_slots)}, host cache {args.max_cpu_adapters}",
        f"  adapter ranks up to {args.max_lora_rank}; asynchronous scheduling {'on' if getattr(llm.engine, 'async_scheduling', False) else 'off'}",
    ]
    infos = sorted(state.engine_loop.adapters().values(), key=lambda i: i.name)
    lines.append(f"  adapters ({len(infos)}):" + ("" if infos else " none"))
    lines += [f"    {i.name}: {i.kind} r={i.rank} policy={i.policy} ({i.path})" for i in infos]
    root = f"from {args.adapter_root}" if args.adapter_root else "disabled (--adapter-root not set)"
    lines.append(f"  runtime adapter loading: {root}; API key: {'required' if args.api_key else 'not required'}")
    lines.append(f"  listening on http://{args.host}:{args.port}/v1")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvicorn

        from preft.server.app import create_app
        from preft.server.graceful import GracefulServer
    except ModuleNotFoundError as e:
        print(f"preft serve needs FastAPI and uvicorn ({e}); install them with: pip install 'preft[server]'", file=sys.stderr)
        return 2
    from preft.errors import PreftError

    try:
        state = build_state(args)
    except (PreftError, ValueError, OSError) as e:
        print(f"preft serve: {e}", file=sys.stderr)
        return 2
    logger.info("%s", summary(state, args))
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        logger.warning("binding %s without --api-key: anyone who can reach this address can use the server", args.host)
    # The engine thread ends only when the engine cannot go on (a tensor-parallel rank died): then so does the server.
    state.engine_loop.on_crash = lambda: signal.raise_signal(signal.SIGTERM)
    app = create_app(state)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)
    # handles SIGINT and SIGTERM: stop accepting, let requests finish for --shutdown-grace-seconds, end the rest, lifespan shutdown
    server = GracefulServer(config, state.engine_loop, args.shutdown_grace_seconds)
    # uvicorn re-raises the signal it shut down on; these handlers make that a clean exit with status 0.
    received: list[str] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: received.append(signal.Signals(signum).name))
    try:
        server.run()
    finally:
        state.engine_loop.shutdown()
        state.engine_loop.engine.close()  # tensor-parallel workers
    if state.engine_loop.error is not None:
        logger.error("preft serve: stopped because the engine failed (see above)")
        return 1
    logger.info("preft serve: stopped%s", f" on {received[0]}" if received else "")
    return 0 if server.started else 1
