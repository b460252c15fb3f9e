import json
from pathlib import Path

import pytest
import torch

from preft.tiny import build_tiny_checkpoint

# The toy mapping task: four prompts, each with a short target completion.
TOY_PAIRS = {"cat=": "dog", "sun=": "moon", "red=": "blue", "one=": "two"}


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(1)  # the CI box is shared; tiny models gain nothing from more threads


@pytest.fixture(scope="session", autouse=True)
def _datasets_cache(tmp_path_factory):
    """datasets caches every file it reads (Arrow) under ~/.cache; keep the tests' copies in a temporary folder."""
    import os

    import datasets

    cache = str(tmp_path_factory.mktemp("hf_datasets_cache"))
    old = os.environ.get("HF_DATASETS_CACHE"), datasets.config.HF_DATASETS_CACHE
    os.environ["HF_DATASETS_CACHE"] = datasets.config.HF_DATASETS_CACHE = cache  # subprocesses (CLI, torchrun) too
    yield
    datasets.config.HF_DATASETS_CACHE = old[1]
    if old[0] is None:
        os.environ.pop("HF_DATASETS_CACHE", None)
    else:
        os.environ["HF_DATASETS_CACHE"] = old[0]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", "llama")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "qwen3", "qwen3")


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


@pytest.fixture
def toy_sft(tmp_path) -> Path:
    return write_jsonl(tmp_path / "toy.jsonl", [{"prompt": p, "completion": c} for p, c in TOY_PAIRS.items()])
