"""Datasets: JSONL rows in TRL's formats, tokenised into prompt and completion tokens.

- ``{"prompt": str, "completion": str}``: the prompt is tokenised alone (as a server would) and the
  completion is tokenised after it, with EOS appended.
- ``{"messages": [{"role", "content"}, ...]}``: the model's chat template. Everything up to the
  final assistant turn (system, user, earlier assistant turns, the generation prompt) is prompt;
  the final assistant turn is the completion.
- GRPO prompts: ``{"prompt": str}`` or ``{"messages": [...]}`` without a final assistant turn;
  every other column is passed to the reward functions.

A bad row raises ``DataError`` naming the file and line, or, with ``skip_bad_rows``, is skipped
and counted.
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


def _chat_split(tokenizer: Any, messages: Any, needs_answer: bool) -> tuple[str, str | None]:
    """Prompt text and final-assistant-turn text of a messages row (via the chat template)."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise ValueError("'messages' must be a non-empty list of {'role', 'content'} objects")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("'messages' rows need a tokenizer with a chat_template; use prompt/completion rows instead")
    if not needs_answer:
        if messages[-1]["role"] == "assistant":
            raise ValueError("a GRPO prompt must not end with an assistant turn (the policy writes it)")
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), None
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"the last message must be the assistant's answer (role 'assistant'), got role {messages[-1]['role']!r}")
    if not str(messages[-1]["content"]).strip():
        raise ValueError("the final assistant message is empty")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template does not render the conversation as prompt + final assistant turn")
    return prompt, full[len(prompt) :]


def tokenize_row(row: Any, tokenizer: Any, needs_completion: bool) -> Example:
    """Tokenise one parsed JSON row; raises ``ValueError`` with the reason when it is unusable."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        prompt_text, completion_text = _chat_split(tokenizer, row["messages"], needs_completion)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"] if completion_text else []
        prompt, rest = row["messages"], {k: v for k, v in row.items() if k != "messages"}
    elif "prompt" in row:
        if not isinstance(row["prompt"], str) or not row["prompt"]:
            raise ValueError("'prompt' must be a non-empty string")
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        completion_ids = []
        if needs_completion:
            if "completion" not in row:
                raise ValueError("missing field 'completion' (rows need 'prompt' and 'completion', or 'messages')")
            if not isinstance(row["completion"], str) or not row["completion"]:
                raise ValueError("'completion' is empty; there is nothing to learn from this row")
            completion_ids = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                completion_ids = completion_ids + [tokenizer.eos_token_id]
        prompt, rest = row["prompt"], {k: v for k, v in row.items() if k not in ("prompt", "completion")}
    else:
        fields = "'prompt' and 'completion', or 'messages'" if needs_completion else "'prompt' or 'messages'"
        raise ValueError(f"missing fields: rows need {fields}; got keys {sorted(row)}")
    if not prompt_ids:
        raise ValueError("the prompt tokenises to no tokens")
    return Example(prompt_ids, completion_ids, prompt, rest)


def load_examples(
    path: str | Path, tokenizer: Any, max_length: int, needs_completion: bool = True, skip_bad_rows: bool = False
) -> tuple[list[Example], LoadReport]:
    """Read and tokenise a JSONL dataset.

    SFT (``needs_completion``): a prompt of ``max_length`` tokens or more is an error (no room for
    the completion); a longer prompt+completion keeps the prompt and truncates the completion.
    GRPO: ``max_length`` bounds the prompt.
    """
    report, examples = LoadReport(), []
    for number, row, error in read_jsonl(path):
        where = f"{path}:{number}"
        try:
            if error:
                raise ValueError(error)
            example = tokenize_row(row, tokenizer, needs_completion)
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
        raise DataError(f"{path}: no usable rows ({report.summary()})")
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


def user_column_of(path: str | Path, user_column: str = "auto") -> str | None:
    """The column naming each row's user, ``""`` for a folder (one file per user), or None (one adapter).

    ``user_column``: ``auto`` (``user`` or ``adapter`` if the first row has it), ``none``, or a column name.
    """
    path = Path(path)
    if user_column == "none":
        if path.is_dir():
            raise DataError(f"--user_column none needs a dataset file, but {str(path)!r} is a folder (one JSONL file per user)")
        return None
    if path.is_dir():
        return ""
    if user_column != "auto":
        return user_column
    first = next((row for _, row, error in read_jsonl(path) if error is None and isinstance(row, dict)), None)
    return next((c for c in USER_COLUMNS if first is not None and c in first), None)


def load_user_examples(
    path: str | Path, tokenizer: Any, max_length: int, user_column: str = "auto", skip_bad_rows: bool = False
) -> tuple[dict[str, list[Example]], LoadReport]:
    """Rows grouped by user, each user's rows in file order: ``{user: examples}``.

    ``path`` is a JSONL file whose rows name their user in ``user_column`` (see ``user_column_of``),
    or a folder of ``<user>.jsonl`` files. Users keep their order of first appearance (a folder: sorted).
    A row without a valid user name is a bad row (``file:line``), like any other.
    """
    path = Path(path)
    column = user_column_of(path, user_column)
    if column is None:
        raise DataError(f"{path}: no user column (expected one of {list(USER_COLUMNS)} or --user_column NAME), so it has one adapter")
    users: dict[str, list[Example]] = {}
    report = LoadReport()
    if column == "":
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise DataError(f"dataset folder {str(path)!r} has no *.jsonl files (expected one file per user, named <user>.jsonl)")
        for file in files:
            if not USER_NAME.match(file.stem):
                raise DataError(f"{file}: the file name must be a user name (letters, digits, '_' and '-'), got {file.stem!r}")
            examples, part = load_examples(file, tokenizer, max_length, skip_bad_rows=skip_bad_rows)
            users[file.stem] = examples
            report.skipped += part.skipped
            report.truncated += part.truncated
        report.rows = sum(len(e) for e in users.values())
        return users, report
    examples, report = load_examples(path, tokenizer, max_length, skip_bad_rows=skip_bad_rows)
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
