"""preft.models: model folders, GGUF files converted once (cached by content, atomically), and the built-in default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preft import models
from preft.errors import PreftError


@pytest.fixture
def fake_conversion(monkeypatch):
    """Replace the (26 s) transformers dequantisation with a fast fake; record each call."""
    calls = []

    def write(gguf: Path, out: Path) -> None:
        calls.append(gguf)
        (out / "config.json").write_text(json.dumps({"converted_from": gguf.name}))

    monkeypatch.setattr(models, "write_hf_folder", write)
    return calls


def test_cache_dir_honours_preft_cache_then_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv("PREFT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "preft"
    monkeypatch.setenv("PREFT_CACHE", str(tmp_path / "mine"))
    assert models.cache_dir() == tmp_path / "mine"


def test_a_gguf_is_converted_once_and_then_served_from_the_cache(tmp_path, fake_conversion):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF one")
    first = models.resolve_model(gguf, cache=tmp_path / "cache")
    assert models.resolve_model(str(gguf), cache=tmp_path / "cache") == first
    assert len(fake_conversion) == 1 and (first / "config.json").is_file() and models.is_converted(first)
    gguf.write_bytes(b"GGUF two")  # new content: a new key, converted again, the old copy untouched
    second = models.resolve_model(gguf, cache=tmp_path / "cache")
    assert second != first and len(fake_conversion) == 2 and models.is_converted(first)


def test_a_killed_conversion_leaves_nothing_a_later_start_trusts(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    cache = tmp_path / "cache"

    def dies(gguf: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "write_hf_folder", dies)
    with pytest.raises(KeyboardInterrupt):
        models.convert_gguf(gguf, cache)
    assert list((cache / "gguf").iterdir()) == []  # neither the target nor the temporary folder is left
    # A half folder at the target (e.g. from a crash mid-rename, no completion marker) is rebuilt, not trusted.
    target = models.gguf_cache_path(gguf, cache)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    monkeypatch.setattr(models, "write_hf_folder", lambda g, out: (out / "config.json").write_text('{"good": 1}'))
    assert models.convert_gguf(gguf, cache) == target and (target / "config.json").read_text() == '{"good": 1}'


def test_folders_pass_through_and_bad_sources_are_named(tmp_path):
    assert models.resolve_model(tmp_path) == tmp_path
    with pytest.raises(PreftError, match="'missing.gguf' does not exist"):
        models.resolve_model(tmp_path / "missing.gguf")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(PreftError, match="neither a model folder nor a .gguf file"):
        models.resolve_model(tmp_path / "weights.bin")
    with pytest.raises(PreftError, match="not found"):
        models.resolve_model(tmp_path / "nowhere")


def test_an_unreadable_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(PreftError, match="broken.gguf"):
        models.convert_gguf(bad, tmp_path / "cache")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


@pytest.mark.real_model
def test_default_and_the_shipped_gguf_resolve_to_the_converted_smollm2(smollm2_dir):
    from transformers import AutoConfig, AutoTokenizer

    assert models.resolve_model(None) == models.resolve_model("default") == models.resolve_model(models.smollm2_gguf()) == smollm2_dir
    config = AutoConfig.from_pretrained(smollm2_dir)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == ("llama", 30, 576, 49152)
    assert getattr(config, "quantization_config", None) is None  # saved as a plain float32 checkpoint
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template
