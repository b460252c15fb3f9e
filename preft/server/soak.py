"""Fault-injection soak of ``preft serve``: many streams, adapter churn, poison requests and poisoned adapters.

Everything runs in this process on 127.0.0.1 (a real uvicorn server on a free port), for a bounded time:

1. set-up: a model (a tiny random checkpoint by default), an adapter root of good adapters, and one
   adapter of each poisoned kind (huge weights, NaN, a bad config type, a target module that matches
   nothing, a symlink leaving the root);
2. reference: every good request template is served alone, once; its greedy tokens are the truth;
3. soak: ``streams`` clients send streamed and plain requests (some ``n = 2``, some with a temperature
   below 1e-5) and compare every token with the reference; one client loads, uses and unloads adapters
   (churn); one injects poison (oversized and malformed bodies, requests to an adapter whose weights
   turned to 1e30 after registration, loads of poisoned adapters);
4. checks: every good request completed with its reference tokens and exactly one finish per choice,
   every poison got its error (and only its request failed), nothing was lost, the engine holds no KV
   block, slot or request, resident memory is back near its baseline, and the server still answers.

``python -m preft.server.soak --minutes 10`` is the long run (docs/server.md has its last results);
``tests/server/test_server_soak.py`` runs a short one in CI.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import socket
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GOOD = ["lora-p", "lora-a", "direft-p", "loreft-a", None]  # None: the base model
PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):", "1, 2, 3, 4,"]
NUM_CHURN = 4  # adapters loaded, used and unloaded over and over
MAX_TOKENS = 8


@dataclass
class SoakReport:
    seconds: float = 0.0
    requests: Counter = field(default_factory=Counter)  # kind -> count sent
    failures: list[str] = field(default_factory=list)  # what went wrong (empty: the soak passed)
    rss_baseline_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_peak_mb: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    def fail(self, message: str) -> None:
        if len(self.failures) < 50:
            self.failures.append(message)

    def summary(self) -> dict:
        total = sum(self.requests.values())
        return {
            "ok": self.ok,
            "seconds": round(self.seconds, 1),
            "requests": total,
            "requests_per_s": round(total / max(self.seconds, 1e-9), 1),
            "by_kind": dict(sorted(self.requests.items())),
            "rss_mb": {"baseline": round(self.rss_baseline_mb), "peak": round(self.rss_peak_mb), "end": round(self.rss_end_mb)},
            "failures": self.failures,
        }


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _adapters(model_config: Any, root: Path, outside: Path) -> None:
    """Good adapters (``GOOD``, ``churn-*``) and one poisoned adapter of each kind under ``root``."""
    from safetensors.torch import load_file, save_file

    from preft.adapters import LoraConfig, ReftConfig, save_adapter
    from preft.tiny import random_adapter

    configs = {
        "lora-p": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], policy="prefill"),
        "lora-a": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], policy="all"),
        "direft-p": ReftConfig(kind="direft", r=2, policy="prefill"),
        "loreft-a": ReftConfig(kind="loreft", r=2, policy="all"),
    }
    for i in range(NUM_CHURN):
        configs[f"churn-{i}"] = LoraConfig(r=2 + i % 3, target_modules=["q_proj", "o_proj"], policy="prefill" if i % 2 else "all")
    for seed, (name, config) in enumerate(configs.items()):
        save_adapter(random_adapter(model_config, config, seed=seed + 1, std=0.3), root / name)
    poison = LoraConfig(r=2, target_modules=["q_proj"])
    for name, edit in {"huge": 3e37, "nan": float("nan")}.items():
        path = save_adapter(random_adapter(model_config, poison, seed=99), root / f"poison-{name}")
        state = load_file(str(path / "adapter_model.safetensors"))
        next(iter(state.values()))[0, 0] = edit
        save_file(state, str(path / "adapter_model.safetensors"))
    for name, change in {"alpha": ("preft", {"lora_alpha": "x"}), "target": (None, {"target_modules": ["no_such_proj"]})}.items():
        path = save_adapter(random_adapter(model_config, poison, seed=98), root / f"poison-{name}")
        config = json.loads((path / "adapter_config.json").read_text())
        if change[0] is None:
            config.pop("preft")
        (config[change[0]] if change[0] else config).update(change[1])
        (path / "adapter_config.json").write_text(json.dumps(config))
    save_adapter(random_adapter(model_config, poison, seed=97), outside / "elsewhere")
    os.symlink(outside / "elsewhere", root / "poison-link")


class Soak:
    def __init__(self, model: str, workdir: Path, streams: int, seed: int = 0):
        from transformers import AutoConfig

        from preft.engine import LLM
        from preft.server.app import ServerState
        from preft.server.engine_loop import EngineLoop
        from preft.server.limits import ServerLimits
        from preft.tiny import build_tiny_checkpoint

        self.streams, self.rng = streams, random.Random(seed)
        model_dir = build_tiny_checkpoint(workdir / "tiny", "llama") if model == "tiny" else model
        self.root, outside = workdir / "adapters", workdir / "outside"
        self.root.mkdir()
        outside.mkdir()
        self.llm = LLM(model_dir, dtype="float32", device="cpu", max_adapter_slots=4, max_cpu_adapters=4, max_num_seqs=32)
        _adapters(AutoConfig.from_pretrained(self.llm.engine.model_dir), self.root, outside)
        for name in GOOD[:-1]:
            self.llm.add_adapter(name, self.root / name)
        self.loop = EngineLoop(self.llm)
        self.loop.start()
        limits = ServerLimits(max_request_body_bytes=1 << 20)
        self.state = ServerState(self.loop, self.llm.tokenizer, "base", self.llm.max_model_len, adapter_root=self.root, limits=limits)
        self.report = SoakReport()
        self.lock = threading.Lock()

    # ---- the server ---------------------------------------------------------------------------

    def start(self) -> None:
        import uvicorn

        from preft.server.app import create_app

        self.port = _free_port()
        config = uvicorn.Config(create_app(self.state), host="127.0.0.1", port=self.port, log_level="error", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the soak's server did not start")
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.loop.shutdown()

    # ---- requests -----------------------------------------------------------------------------

    def body(self, adapter: str | None, prompt: str, **fields: Any) -> dict:
        return {"model": adapter or "base", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True, **fields}  # fmt: skip

    def complete(self, http: Any, body: dict) -> tuple[int, list[list[int]], str | None]:
        """(status, token ids per choice, error message); streams are checked for one finish per choice and ``[DONE]``."""
        n = body.get("n", 1)
        if not body.get("stream"):
            r = http.post("/v1/completions", json=body)
            if r.status_code != 200:
                return r.status_code, [], r.json()["error"]["message"]
            return 200, [c["token_ids"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])], None
        tokens: list[list[int]] = [[] for _ in range(n)]
        finishes, done, error = Counter(), False, None
        with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                return r.status_code, [], r.json()["error"]["message"]
            for line in r.iter_lines():
                if not line:
                    continue
                if done:
                    self.report.fail(f"data after [DONE]: {line[:80]}")
                if line == "data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    error = chunk["error"]["message"]
                    continue
                for c in chunk["choices"]:
                    tokens[c["index"]] += c.get("token_ids") or []
                    finishes[c["index"]] += c["finish_reason"] is not None
        if not done:
            self.report.fail(f"a stream ended without [DONE] ({body['model']})")
        if error is None and any(finishes[i] != 1 for i in range(n)):
            self.report.fail(f"finish chunks per choice {dict(finishes)} for n={n} ({body['model']})")
        return 200, tokens, error

    def expect(self, http: Any, kind: str, adapter: str | None, prompt: str, **fields: Any) -> None:
        status, tokens, error = self.complete(http, self.body(adapter, prompt, **fields))
        want = self.reference[(adapter, prompt)]
        if status != 200 or error is not None:
            self.report.fail(f"{kind} request to {adapter or 'base'} failed: {status} {error}")
        elif any(t != want for t in tokens) or len(tokens) != fields.get("n", 1):
            self.report.fail(f"{kind} request to {adapter or 'base'} got {tokens}, alone it gets {want}")
        with self.lock:
            self.report.requests[kind] += 1

    def compute_reference(self, http: Any) -> None:
        """Each good template served alone: the tokens every later copy of it must get."""
        self.reference = {}
        names = GOOD + [f"churn-{i}" for i in range(NUM_CHURN)]
        for name in names:
            churn = name is not None and name.startswith("churn")
            if churn:
                assert http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": name}).status_code == 200
            for prompt in PROMPTS:
                status, tokens, error = self.complete(http, self.body(name, prompt))
                if status != 200 or error:
                    raise RuntimeError(f"reference request to {name} failed: {status} {error}")
                self.reference[(name, prompt)] = tokens[0]
            if churn:
                assert http.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200

    # ---- clients ------------------------------------------------------------------------------

    def good_client(self, deadline: float, seed: int) -> None:
        import httpx

        rng = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=120) as http:
            while time.monotonic() < deadline:
                adapter, prompt = rng.choice(GOOD), rng.choice(PROMPTS)
                fields: dict[str, Any] = {"stream": rng.random() < 0.7}
                if rng.random() < 0.2:
                    fields["n"] = 2
                if rng.random() < 0.1:
                    fields["temperature"] = 1e-40  # greedy, as vLLM: once an engine-wide failure
                self.expect(http, "good", adapter, prompt, **fields)

    def churn_client(self, deadline: float, seed: int) -> None:
        import httpx

        rng = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=120) as http:
            while time.monotonic() < deadline:
                name = f"churn-{rng.randrange(NUM_CHURN)}"
                loaded = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": name})
                if loaded.status_code != 200:
                    self.report.fail(f"churn load of {name}: {loaded.status_code} {loaded.text[:200]}")
                    continue
                self.expect(http, "churn", name, rng.choice(PROMPTS), stream=True)
                unloaded = http.post("/v1/unload_lora_adapter", json={"lora_name": name})
                if unloaded.status_code != 200:
                    self.report.fail(f"churn unload of {name}: {unloaded.status_code} {unloaded.text[:200]}")
                with self.lock:
                    self.report.requests["churn-load-unload"] += 1

    def poison_client(self, deadline: float, seed: int) -> None:
        import httpx

        rng = random.Random(seed)
        good = self.body("lora-p", PROMPTS[0])
        poisons: list[tuple[str, str, Any, int]] = [
            ("oversized", "/v1/completions", {**good, "prompt": "x" * (1 << 20)}, 413),
            ("surrogate", "/v1/completions", {**good, "prompt": "a\ud800"}, 400),
            ("seed", "/v1/completions", {**good, "seed": 2**64}, 400),
            ("n", "/v1/completions", {**good, "n": 1000}, 400),
            ("prompts", "/v1/completions", {**good, "prompt": ["x"] * 1000}, 400),
            ("content-part", "/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400),
            ("unknown-model", "/v1/completions", {**good, "model": "nobody"}, 404),
            ("not-json", "/v1/completions", b"{oops", 400),
            *[(f"load-{p}", "/v1/load_lora_adapter", {"lora_name": f"bad-{p}", "lora_path": f"poison-{p}"}, 400) for p in ("huge", "nan", "alpha", "target")],
            ("load-link", "/v1/load_lora_adapter", {"lora_name": "bad-link", "lora_path": "poison-link"}, 403),
        ]  # fmt: skip
        with httpx.Client(base_url=self.url, timeout=120) as http:
            while time.monotonic() < deadline:
                if rng.random() < 0.3:
                    self.poisoned_adapter_request(http)
                    continue
                kind, route, body, status = rng.choice(poisons)
                content = body if isinstance(body, bytes) else json.dumps(body).encode()
                r = http.post(route, content=content, headers={"content-type": "application/json"})
                if r.status_code != status or "error" not in r.json():
                    self.report.fail(f"poison {kind}: status {r.status_code}, wanted {status}: {r.text[:200]}")
                with self.lock:
                    self.report.requests[f"poison-{kind}"] += 1
        names = set(self.loop.adapters())
        if any(n.startswith("bad-") for n in names):
            self.report.fail(f"a poisoned adapter was registered: {sorted(names)}")

    def poisoned_adapter_request(self, http: Any) -> None:
        """An adapter that passed validation and then turned to 1e30 (memory corruption, a bug): only its request fails."""
        from preft.adapters import LoraConfig
        from preft.tiny import random_adapter

        name = f"rotten-{self.rng.randrange(1 << 30)}"
        adapter = random_adapter(self.llm.engine.config, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), seed=5, std=0.3)

        def register_and_rot() -> None:
            self.llm.engine.add_adapter(name, adapter)
            for tensor in self.llm.engine.adapters.entries[name].pinned.tensors.values():
                tensor.mul_(1e30)
            self.loop._adapters[name] = self.llm.engine.adapters.get(name).info

        self.loop.call(register_and_rot).result()
        status, _, error = self.complete(http, self.body(name, PROMPTS[1], stream=self.rng.random() < 0.5))
        if not ((status == 500 and error and "non-finite" in error) or (status == 200 and error and "non-finite" in error)):
            self.report.fail(f"a request to a rotten adapter got {status} {error}")
        http.post("/v1/unload_lora_adapter", json={"lora_name": name})
        with self.lock:
            self.report.requests["poison-rotten-adapter"] += 1

    # ---- the run ------------------------------------------------------------------------------

    def run(self, seconds: float) -> SoakReport:
        import httpx

        self.start()
        try:
            with httpx.Client(base_url=self.url, timeout=120) as http:
                self.compute_reference(http)
            gc.collect()
            self.report.rss_baseline_mb = self.report.rss_peak_mb = _rss_mb()
            start = time.monotonic()
            deadline = start + seconds
            workers = [threading.Thread(target=self.good_client, args=(deadline, i)) for i in range(self.streams)]
            workers += [
                threading.Thread(target=self.churn_client, args=(deadline, 100)),
                threading.Thread(target=self.poison_client, args=(deadline, 200)),
            ]
            for w in workers:
                w.start()
            while any(w.is_alive() for w in workers):
                self.report.rss_peak_mb = max(self.report.rss_peak_mb, _rss_mb())
                time.sleep(0.2)
            self.report.seconds = time.monotonic() - start
            self.check_end_state()
        finally:
            self.stop()
        return self.report

    def check_end_state(self) -> None:
        import httpx

        deadline = time.monotonic() + 30
        while self.loop.engine.has_unfinished_requests() and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = self.loop.call(self.loop.engine.stats).result()
        if stats["kv_blocks_used"] or stats["adapter_slots_used"] or stats["num_running"] or stats["num_waiting"]:
            self.report.fail(f"the engine still holds work at the end: {stats}")
        if self.loop.engine.requests:
            self.report.fail(f"the engine still knows requests {sorted(self.loop.engine.requests)[:5]}")
        leftover = sorted(n for n in self.loop.adapters() if n not in GOOD)
        if leftover:
            self.report.fail(f"adapters left registered: {leftover}")
        gc.collect()
        self.report.rss_end_mb = _rss_mb()
        if self.report.rss_end_mb > self.report.rss_baseline_mb + max(128, 0.25 * self.report.rss_baseline_mb):
            self.report.fail(
                f"resident memory {self.report.rss_end_mb:.0f} MB did not return near its baseline {self.report.rss_baseline_mb:.0f} MB"
            )
        with httpx.Client(base_url=self.url, timeout=60) as http:
            if http.get("/health").json() != {"status": "ok"}:
                self.report.fail("the server is not healthy at the end")
            self.expect(http, "final", "lora-p", PROMPTS[0])


def run_soak(seconds: float, streams: int = 8, model: str = "tiny", seed: int = 0) -> SoakReport:
    """Run the soak for ``seconds`` with ``streams`` good clients (plus a churn and a poison client)."""
    workdir = Path(tempfile.mkdtemp(prefix="preft-soak-"))
    try:
        return Soak(model, workdir, streams, seed).run(seconds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m preft.server.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the soak runs (default 10)")
    parser.add_argument("--streams", type=int, default=16, help="concurrent good clients (default 16)")
    parser.add_argument("--model", default="tiny", help="'tiny' (a random tiny checkpoint), 'default' (SmolLM2-135M) or a model folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    report = run_soak(args.minutes * 60, args.streams, args.model, args.seed)
    print(json.dumps(report.summary(), indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
