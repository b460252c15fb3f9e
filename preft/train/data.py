"""Datasets in TRL's formats, read with the ``datasets`` library and tokenised into prompt and completion tokens.

Sources: a JSONL, JSON, Parquet or CSV file, a folder of such files or one written by
``Dataset.save_to_disk`` (``--dataset_name``), or a ``datasets.Dataset`` / list of dicts (Python API).
Rows, as TRL names them (the prompt is what a server would prefill, the completion is what it decodes):

- standard prompt/completion ``{"prompt": str, "completion": str}``: the prompt is tokenised alone
  (as ``/v1/completions`` does) and the completion after it, with EOS appended.
- conversational prompt/completion ``{"prompt": [messages], "completion": [messages]}``: the prompt
  is the chat template's rendering of the prompt messages with the generation prompt (what
  ``/v1/chat/completions`` prefills); the completion is the rest of the rendering of both.
- conversational ``{"messages": [...]}``: everything up to the final assistant turn (system, user,
  earlier assistant turns, the generation prompt) is prompt; the final assistant turn is the completion.
- language modelling ``{"text": str}`` (``--dataset_text_field``): the first token (the BOS when the
  tokenizer adds one) is the prompt and every later token, plus EOS, the completion: what serving
  computes when it continues that one token.
- GRPO prompts: ``{"prompt": str | [messages]}`` or ``{"messages": [...]}`` without a final assistant
  turn; every other column is passed to the reward functions.

A bad row raises ``DataError`` naming the file and line (row for non-JSONL sources), or, with
``skip_bad_rows``, is skipped and counted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from preft.errors import PreftError


class DataError(PreftError):
    """A dataset row that cannot be used (the message names the file and line)."""


@dataclass
class Example:
    """One tokenised row: the prompt (adapted under ``prefill``) and the completion (the loss)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    prompt: Any = None  # the row's prompt as given: str, or a messages list
    columns: dict = field(default_factory=dict)  # every other column (for rewards)
    source: str = ""  # "file:line"


@dataclass
class LoadReport:
    rows: int = 0
    skipped: list[str] = field(default_factory=list)  # "file:line: reason"
    truncated: int = 0

    def summary(self) -> str:
        text = f"{self.rows} rows"
        if self.skipped:
            text += f", skipped {len(self.skipped)} bad rows (first: {self.skipped[0]})"
        if self.truncated:
            text += f", {self.truncated} completions truncated to max_length"
        return text


# ---- reading rows ----------------------------------------------------------------------------

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
Rows = list[tuple[str, Any, "str | None"]]  # (where, row, error): error is set for a row that could not be parsed


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError("reading datasets needs the `datasets` package: pip install 'datasets>=2.19'") from None
    return datasets


def read_jsonl(path: str | Path) -> list[tuple[int, Any, str | None]]:
    """``(line_number, row, error)`` for every non-blank line; ``error`` is set for invalid JSON."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset {str(path)!r} is not a file (expected a JSONL file, one JSON object per line)")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line), None))
            except json.JSONDecodeError as e:
                rows.append((number, None, f"not valid JSON ({e.msg} at column {e.colno})"))
    return rows


def dataset_label(source: Any) -> str:
    """How messages name a dataset source: its path, or ``dataset (N rows)``."""
    if isinstance(source, (str, Path)):
        return str(source)
    return f"dataset ({len(source)} rows)" if hasattr(source, "__len__") and not hasattr(source, "keys") else "dataset"


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def open_dataset(source: str | Path, config_name: str | None = None) -> Any:
    """A ``datasets.Dataset`` or ``DatasetDict`` from a data file, a dataset folder (data files, split by their
    names, or a ``save_to_disk`` folder) or, like TRL's ``--dataset_name``, a name ``datasets`` resolves."""
    ds = _datasets()
    path = Path(source)
    try:
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(f"dataset {str(path)!r}: unknown file type {path.suffix!r}; expected one of {sorted(FILE_BUILDERS)}")
            return ds.load_dataset(builder, data_files=str(path), split="train")
        if path.is_dir() and _is_saved_dataset(path):
            return ds.load_from_disk(str(path))
        return ds.load_dataset(str(source), name=config_name)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (missing files, parse errors, no network); all mean the same here
        what = "file" if path.is_file() else "folder" if path.is_dir() else "name (not a local file or folder)"
        raise DataError(f"dataset {str(source)!r} could not be read as a dataset {what}: {type(e).__name__}: {e}") from None


def pick_split(dataset: Any, split: str, source: str) -> Any:
    """The ``split`` of a ``DatasetDict`` (a plain ``Dataset`` is its own train split)."""
    if not hasattr(dataset, "keys"):
        if split != "train":
            raise DataError(f"dataset {source!r} has a single split; it is the train split, not {split!r}")
        return dataset
    if split not in dataset:
        raise DataError(f"dataset {source!r} has no split {split!r} (splits: {sorted(dataset)})")
    return dataset[split]


def _jsonl_line_numbers(path: Path) -> list[int]:
    with path.open(encoding="utf-8") as fh:
        return [n for n, line in enumerate(fh, start=1) if line.strip()]


def read_rows(source: Any, split: str = "train") -> tuple[str, Rows]:
    """A dataset's name (for messages) and its rows as ``(where, row, error)``.

    ``source``: a file or folder path (read with ``datasets``), a ``datasets.Dataset`` /
    ``DatasetDict`` (``split`` picks one), or a list of dicts. A JSON Lines file that ``datasets``
    cannot read (a line that is not JSON, or columns whose types change between rows) is read line
    by line instead, so that every row is usable and a bad line is named ``file:line``.
    """
    if isinstance(source, list):
        return "rows", [(f"row {i + 1}", row, None) for i, row in enumerate(source)]
    if not isinstance(source, (str, Path)):
        data = pick_split(source, split, "dataset")
        return "dataset", [(f"dataset row {i + 1}", row, None) for i, row in enumerate(data.to_list())]
    path = Path(source)
    if not path.exists():
        raise DataError(f"dataset {str(path)!r} does not exist (expected a JSONL, JSON, Parquet or CSV file, or a dataset folder)")
    if path.is_file() and path.suffix.lower() == ".jsonl":
        try:
            data = open_dataset(path).to_list()
        except DataError:
            return str(path), [(f"{path}:{n}", row, error) for n, row, error in read_jsonl(path)]
        lines = _jsonl_line_numbers(path)
        where = [f"{path}:{n}" for n in lines] if len(lines) == len(data) else [f"{path} row {i + 1}" for i in range(len(data))]
        return str(path), list(zip(where, data, [None] * len(data)))
    data = pick_split(open_dataset(path), split, str(path)).to_list()
    label = str(path) if path.is_file() else f"{path}[{split}]"
    return str(path), [(f"{label} row {i + 1}", row, None) for i, row in enumerate(data)]


# ---- tokenising one row ----------------------------------------------------------------------


def _without_none(value: Any) -> Any:
    """Drop the ``None`` fields that ``datasets`` fills in for keys a row (or message) lacks."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


def is_chat(value: Any) -> bool:
    """A list of ``{"role", "content"}`` messages (TRL's conversational format)."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _render_chat(tokenizer: Any, prompt: list, completion: list | None) -> tuple[str, str | None]:
    """Prompt text (the chat with the generation prompt, as a server prefills it) and the completion's text after it."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("conversational rows need a tokenizer with a chat_template; use standard prompt/completion rows instead")
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if completion is None:
        return prompt_text, None
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full.startswith(prompt_text):
        raise ValueError("the chat template does not render the conversation as prompt + completion")
    return prompt_text, full[len(prompt_text) :]


def _chat_split(tokenizer: Any, messages: Any, needs_answer: bool) -> tuple[str, str | None]:
    """Prompt text and final-assistant-turn text of a messages row (via the chat template)."""
    if not is_chat(messages):
        raise ValueError("'messages' must be a non-empty list of {'role', 'content'} objects")
    if not needs_answer:
        if messages[-1]["role"] == "assistant":
            raise ValueError("a GRPO prompt must not end with an assistant turn (the policy writes it)")
        return _render_chat(tokenizer, messages, None)
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"the last message must be the assistant's answer (role 'assistant'), got role {messages[-1]['role']!r}")
    if not str(messages[-1]["content"]).strip():
        raise ValueError("the final assistant message is empty")
    return _render_chat(tokenizer, messages[:-1], messages[-1:])


def _with_eos(ids: list[int], tokenizer: Any) -> list[int]:
    return ids + [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else ids


def tokenize_row(row: Any, tokenizer: Any, needs_completion: bool, text_field: str = "text") -> Example:
    """Tokenise one row (see the module doc for the formats); raises ``ValueError`` with the reason when it is unusable."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    row = _without_none(row)
    if "messages" in row:
        prompt_text, completion_text = _chat_split(tokenizer, row["messages"], needs_completion)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"] if completion_text else []
        prompt, rest = row["messages"], {k: v for k, v in row.items() if k != "messages"}
    elif "prompt" in row:
        prompt, completion = row["prompt"], row.get("completion")
        if needs_completion and completion is None:
            raise ValueError("missing field 'completion' (rows need 'prompt' and 'completion', 'messages' or 'text')")
        if is_chat(prompt):
            if needs_completion and not is_chat(completion):
                raise ValueError("a conversational 'prompt' needs a conversational 'completion' (a list of {'role', 'content'} messages)")
            if needs_completion and not any(str(m["content"]).strip() for m in completion):
                raise ValueError("'completion' is empty; there is nothing to learn from this row")
            prompt_text, completion_text = _render_chat(tokenizer, prompt, completion if needs_completion else None)
            prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
            completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"] if completion_text else []
        elif isinstance(prompt, str) and prompt:
            prompt_ids = tokenizer(prompt)["input_ids"]
            completion_ids = []
            if needs_completion:
                if not isinstance(completion, str):
                    raise ValueError("a standard (string) 'prompt' needs a string 'completion'")
                if not completion:
                    raise ValueError("'completion' is empty; there is nothing to learn from this row")
                completion_ids = _with_eos(tokenizer(completion, add_special_tokens=False)["input_ids"], tokenizer)
        else:
            raise ValueError("'prompt' must be a non-empty string or a non-empty list of {'role', 'content'} messages")
        rest = {k: v for k, v in row.items() if k not in ("prompt", "completion")}
    elif text_field in row and needs_completion:
        text = row[text_field]
        if not isinstance(text, str) or not text:
            raise ValueError(f"{text_field!r} must be a non-empty string")
        ids = _with_eos(tokenizer(text)["input_ids"], tokenizer)
        if len(ids) < 2:
            raise ValueError(f"{text_field!r} tokenises to fewer than 2 tokens: nothing to predict")
        prompt_ids, completion_ids = ids[:1], ids[1:]  # serving continues the first token: it alone is prefilled
        prompt, rest = text, {k: v for k, v in row.items() if k != text_field}
    else:
        fields = f"'prompt' and 'completion', 'messages', or {text_field!r}" if needs_completion else "'prompt' or 'messages'"
        raise ValueError(f"missing fields: rows need {fields}; got keys {sorted(row)}")
    if not prompt_ids:
        raise ValueError("the prompt tokenises to no tokens")
    return Example(prompt_ids, completion_ids, prompt, rest)


def load_examples(
    path: Any,
    tokenizer: Any,
    max_length: int,
    needs_completion: bool = True,
    skip_bad_rows: bool = False,
    split: str = "train",
    text_field: str = "text",
) -> tuple[list[Example], LoadReport]:
    """Read and tokenise a dataset (a path, a ``datasets.Dataset``/``DatasetDict`` or a list of dicts; see ``read_rows``).

    SFT (``needs_completion``): a prompt of ``max_length`` tokens or more is an error (no room for
    the completion); a longer prompt+completion keeps the prompt and truncates the completion.
    GRPO: ``max_length`` bounds the prompt.
    """
    report, examples = LoadReport(), []
    name, rows = read_rows(path, split)
    for where, row, error in rows:
        try:
            if error:
                raise ValueError(error)
            example = tokenize_row(row, tokenizer, needs_completion, text_field)
            limit = max_length - 1 if needs_completion else max_length
            if len(example.prompt_ids) > limit:
                raise ValueError(f"prompt has {len(example.prompt_ids)} tokens, more than the {limit} allowed by max length {max_length}")
        except ValueError as e:
            if not skip_bad_rows:
                raise DataError(f"{where}: {e} (pass --skip_bad_rows to skip and count such rows)") from None
            report.skipped.append(f"{where}: {e}")
            continue
        room = max_length - len(example.prompt_ids)
        if needs_completion and len(example.completion_ids) > room:
            example.completion_ids = example.completion_ids[:room]
            report.truncated += 1
        example.source = where
        examples.append(example)
    report.rows = len(examples)
    if not examples:
        raise DataError(f"{name}: no usable rows ({report.summary()})")
    return examples, report


def adapter_mask_for(prompt_len: int, total_len: int, policy: str) -> list[float]:
    """The serving mask of one ``[prompt ; completion]`` row (DESIGN §1): prefill adapts the prompt only."""
    if policy == "all":
        return [1.0] * total_len
    return [1.0] * prompt_len + [0.0] * (total_len - prompt_len)


@dataclass
class Batch:
    """A right-padded batch of ``[prompt ; completion]`` rows.

    ``completion_mask[b, t] = 1`` where token ``t`` is a completion token: the loss is on the
    logits at ``t - 1`` predicting it (the first completion token is predicted by the last,
    adapted, prompt position, as in serving).
    """

    input_ids: Tensor
    attention_mask: Tensor
    adapter_mask: Tensor
    completion_mask: Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.adapter_mask, self.completion_mask)))


def collate(rows: list[tuple[list[int], list[int]]], policy: str, pad_token_id: int) -> Batch:
    """Right-pad ``(prompt_ids, completion_ids)`` rows and build the masks for ``policy``."""
    longest = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), longest, dtype=torch.long)
    adapter_mask = torch.zeros(len(rows), longest)
    completion_mask = torch.zeros(len(rows), longest)
    for i, (prompt, completion) in enumerate(rows):
        n = len(prompt) + len(completion)
        input_ids[i, :n] = torch.tensor(prompt + completion)
        attention_mask[i, :n] = 1
        adapter_mask[i, :n] = torch.tensor(adapter_mask_for(len(prompt), n, policy))
        completion_mask[i, len(prompt) : n] = 1
    return Batch(input_ids, attention_mask, adapter_mask, completion_mask)


# ---- many users in one dataset -------------------------------------------------------------

USER_COLUMNS = ("user", "adapter")  # the columns that name a row's user under --user_column auto
USER_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")  # a user's name is its adapter's name and its output folder


def _is_users_folder(source: Any) -> bool:
    return isinstance(source, (str, Path)) and Path(source).is_dir() and not _is_saved_dataset(Path(source))


def _first_row(source: Any) -> Any:
    if isinstance(source, list):
        return source[0] if source else None
    if not isinstance(source, (str, Path)):
        data = source["train"] if hasattr(source, "keys") and "train" in source else source
        return {c: True for c in data.column_names} if hasattr(data, "column_names") else None
    path = Path(source)
    if path.suffix.lower() == ".jsonl":  # the first parsable line: no need to read the whole file
        return next((row for _, row, error in read_jsonl(path) if error is None and isinstance(row, dict)), None)
    return next((row for _, row, error in read_rows(path)[1] if isinstance(row, dict)), None)


def user_column_of(path: Any, user_column: str = "auto") -> str | None:
    """The column naming each row's user, ``""`` for a folder (one file per user), or None (one adapter).

    ``user_column``: ``auto`` (``user`` or ``adapter`` if the first row has it), ``none``, or a column name.
    With ``none`` a folder is one dataset (its data files together), as ``--dataset_name`` reads it.
    """
    if user_column == "none":
        return None
    if _is_users_folder(path):
        return ""
    if user_column != "auto":
        return user_column
    first = _first_row(path)
    return next((c for c in USER_COLUMNS if isinstance(first, dict) and c in first), None)


def load_user_examples(
    path: Any, tokenizer: Any, max_length: int, user_column: str = "auto", skip_bad_rows: bool = False, text_field: str = "text"
) -> tuple[dict[str, list[Example]], LoadReport]:
    """Rows grouped by user, each user's rows in file order: ``{user: examples}``.

    ``path`` is a dataset (any source ``read_rows`` takes) whose rows name their user in ``user_column``
    (see ``user_column_of``), or a folder of ``<user>.jsonl`` (or ``.json``, ``.parquet``, ``.csv``) files.
    Users keep their order of first appearance (a folder: sorted). A row without a valid user name is a
    bad row (``file:line``), like any other.
    """
    column = user_column_of(path, user_column)
    if column is None:
        raise DataError(f"{path}: no user column (expected one of {list(USER_COLUMNS)} or --user_column NAME), so it has one adapter")
    users: dict[str, list[Example]] = {}
    report = LoadReport()
    if column == "":
        path = Path(path)
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in FILE_BUILDERS and not f.name.startswith("."))
        if not files:
            raise DataError(
                f"dataset folder {str(path)!r} has no data files (expected one file per user, named <user>.jsonl, .json, .parquet or .csv)"
            )
        for file in files:
            if not USER_NAME.match(file.stem):
                raise DataError(f"{file}: the file name must be a user name (letters, digits, '_' and '-'), got {file.stem!r}")
            if file.stem in users:
                raise DataError(f"{file}: user {file.stem!r} has two files in {str(path)!r}")
            examples, part = load_examples(file, tokenizer, max_length, skip_bad_rows=skip_bad_rows, text_field=text_field)
            users[file.stem] = examples
            report.skipped += part.skipped
            report.truncated += part.truncated
        report.rows = sum(len(e) for e in users.values())
        return users, report
    examples, report = load_examples(path, tokenizer, max_length, skip_bad_rows=skip_bad_rows, text_field=text_field)
    for example in examples:
        user = example.columns.get(column)
        if not isinstance(user, str) or not USER_NAME.match(user):
            problem = (
                f"missing column {column!r}" if user is None else f"{column!r} must be a name of letters, digits, '_' and '-', got {user!r}"
            )
            if not skip_bad_rows:
                raise DataError(f"{example.source}: {problem} (every row of a multi-user dataset names its user)")
            report.skipped.append(f"{example.source}: {problem}")
            continue
        users.setdefault(user, []).append(example)
    report.rows = sum(len(e) for e in users.values())
    if not users:
        raise DataError(f"{path}: no usable rows ({report.summary()})")
    return users, report
