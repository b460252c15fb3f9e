"""``preft`` command line: one subcommand per capability, each defined next to the code it drives.

A subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Modules are
imported lazily so that, e.g., ``preft generate`` works without the server's dependencies.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "demo": ("preft.demo", "prefill-only vs all-token generation on a tiny model built on the spot"),
    "serve": ("preft.server.cli", "OpenAI-compatible server with per-user adapters"),
    "generate": ("preft.engine.cli", "offline generation with the serving engine"),
    "train": ("preft.train.cli", "train an adapter: SFT or GRPO with the serving semantics"),
    "bench": ("preft.bench.cli", "throughput benchmark: base vs multi-LoRA vs PreFT"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="preft", description="Prefill-only adapters: train and serve.")
    sub = parser.add_subparsers(dest="command")
    modules = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and (e.name == module_name or module_name.startswith(e.name + ".")):
                continue  # that capability is not part of this build
            sub.add_parser(name, help=f"(unavailable: {e})")
            continue
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
        modules[name] = module
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command not in modules:
        parser.error(f"'{args.command}' is unavailable in this installation")
    return modules[args.command].run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
