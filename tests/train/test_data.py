import re

import pytest
import torch

from preft.tiny import build_tokenizer
from preft.train.data import DataError, collate, load_examples

from .conftest import write_jsonl


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_prompt_completion_row_tokenises_prompt_alone_and_appends_eos(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ab", "completion": "cd", "extra": 1}])
    [ex], report = load_examples(path, tokenizer, max_length=64)
    assert tokenizer.decode(ex.prompt_ids) == "ab"
    assert ex.completion_ids[-1] == tokenizer.eos_token_id and tokenizer.decode(ex.completion_ids[:-1]) == "cd"
    assert ex.columns == {"extra": 1} and ex.source.endswith("d.jsonl:1") and report.rows == 1


def test_messages_row_puts_every_earlier_turn_in_the_prompt(tmp_path, tokenizer):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "EARLIER"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "FINAL"},
    ]
    [ex], _ = load_examples(write_jsonl(tmp_path / "m.jsonl", [{"messages": messages}]), tokenizer, max_length=256)
    prompt, completion = tokenizer.decode(ex.prompt_ids), tokenizer.decode(ex.completion_ids)
    assert "EARLIER" in prompt and "be brief" in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert completion.startswith("FINAL<|im_end|>") and "again" not in completion
    assert tokenizer.decode(ex.prompt_ids + ex.completion_ids) == tokenizer.apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize("policy", ["prefill", "all"])
def test_collate_builds_the_serving_adapter_mask_and_completion_mask(policy):
    batch = collate([([7, 8, 9], [10, 11]), ([7], [12])], policy, pad_token_id=0)
    assert batch.input_ids.tolist() == [[7, 8, 9, 10, 11], [7, 12, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch.completion_mask.tolist() == [[0, 0, 0, 1, 1], [0, 1, 0, 0, 0]]
    want = [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]] if policy == "prefill" else [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert torch.equal(batch.adapter_mask, torch.tensor(want, dtype=torch.float))


BAD_ROWS = {
    "not valid JSON": '{"prompt": "a", "completion": ',
    "missing field 'completion'": {"prompt": "a"},
    "missing fields": {"question": "a", "answer": "b"},
    "'completion' is empty": {"prompt": "a", "completion": ""},
    "more than the 15 allowed": {"prompt": "x" * 40, "completion": "y"},
    "last message must be the assistant": {"messages": [{"role": "user", "content": "hi"}]},
}


@pytest.mark.parametrize("reason", list(BAD_ROWS))
def test_bad_row_error_names_file_line_and_reason(tmp_path, tokenizer, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, "", BAD_ROWS[reason]])
    with pytest.raises(DataError) as err:
        load_examples(path, tokenizer, max_length=16)
    assert "bad.jsonl:3: " in str(err.value) and reason in str(err.value) and "--skip_bad_rows" in str(err.value)


def test_skip_bad_rows_skips_and_counts(tmp_path, tokenizer):
    rows = [{"prompt": "a", "completion": "b"}, *BAD_ROWS.values(), {"prompt": "c", "completion": "d"}]
    examples, report = load_examples(write_jsonl(tmp_path / "mixed.jsonl", rows), tokenizer, max_length=16, skip_bad_rows=True)
    assert [tokenizer.decode(e.prompt_ids) for e in examples] == ["a", "c"]
    assert len(report.skipped) == len(BAD_ROWS) and "skipped 6 bad rows" in report.summary()


def test_long_completion_is_truncated_and_counted(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "ab", "completion": "y" * 30}])
    [ex], report = load_examples(path, tokenizer, max_length=10)
    assert len(ex.prompt_ids) + len(ex.completion_ids) == 10 and report.truncated == 1


def test_grpo_prompt_must_not_end_with_assistant_turn(tmp_path, tokenizer):
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(DataError, match=r"p\.jsonl:1: .*must not end with an assistant turn"):
        load_examples(write_jsonl(tmp_path / "p.jsonl", [{"messages": msgs}]), tokenizer, 64, needs_completion=False)


def test_missing_dataset_file_is_a_clear_error(tmp_path, tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl", tokenizer, 64)


# ---- TRL's formats and sources (read with the datasets library) --------------------------------

CHAT_PROMPT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def test_conversational_prompt_completion_row_splits_where_the_server_prefills(tmp_path, tokenizer):
    row = {"prompt": CHAT_PROMPT, "completion": [{"role": "assistant", "content": "FINAL"}]}
    [ex], _ = load_examples(write_jsonl(tmp_path / "c.jsonl", [row]), tokenizer, max_length=256)
    # The prompt is exactly what /v1/chat/completions prefills for that chat (template + generation prompt, no extra BOS).
    served = tokenizer.apply_chat_template(CHAT_PROMPT, tokenize=False, add_generation_prompt=True)
    assert ex.prompt_ids == tokenizer.encode(served, add_special_tokens=False)
    assert tokenizer.decode(ex.completion_ids).startswith("FINAL<|im_end|>")
    assert tokenizer.decode(ex.prompt_ids + ex.completion_ids) == tokenizer.apply_chat_template(
        row["prompt"] + row["completion"], tokenize=False
    )
    # the same conversation as a messages row gives the same tokens
    [same], _ = load_examples(write_jsonl(tmp_path / "m.jsonl", [{"messages": row["prompt"] + row["completion"]}]), tokenizer, 256)
    assert (same.prompt_ids, same.completion_ids) == (ex.prompt_ids, ex.completion_ids)


def test_conversational_prompt_only_row_is_a_grpo_prompt(tmp_path, tokenizer):
    [ex], _ = load_examples(
        write_jsonl(tmp_path / "p.jsonl", [{"prompt": CHAT_PROMPT, "answer": "4"}]), tokenizer, 256, needs_completion=False
    )
    assert tokenizer.decode(ex.prompt_ids).endswith("<|im_start|>assistant\n") and ex.completion_ids == []
    assert ex.prompt == CHAT_PROMPT and ex.columns == {"answer": "4"}


def test_text_row_prefills_the_first_token_and_learns_the_rest(tmp_path, tokenizer):
    [ex], _ = load_examples(write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}]), tokenizer, max_length=64)
    ids = tokenizer("hello world")["input_ids"]
    assert ex.prompt_ids == ids[:1] and ex.completion_ids == ids[1:] + [tokenizer.eos_token_id]
    [other], _ = load_examples(write_jsonl(tmp_path / "o.jsonl", [{"body": "hello world"}]), tokenizer, 64, text_field="body")
    assert other.prompt_ids + other.completion_ids == ex.prompt_ids + ex.completion_ids


def test_mixed_row_formats_in_one_file_each_load(tmp_path, tokenizer):
    rows = [
        {"prompt": "ab", "completion": "cd"},
        {"prompt": CHAT_PROMPT, "completion": [{"role": "assistant", "content": "x"}]},
        {"messages": [*CHAT_PROMPT, {"role": "assistant", "content": "y"}]},
        {"text": "plain"},
    ]
    examples, report = load_examples(write_jsonl(tmp_path / "mixed.jsonl", rows), tokenizer, 256)
    assert report.rows == 4 and [e.source.rsplit(":", 1)[1] for e in examples] == ["1", "2", "3", "4"]


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".json", ".jsonl"])
def test_every_file_type_datasets_reads_gives_the_same_examples(tmp_path, tokenizer, suffix):
    from datasets import Dataset

    rows = [{"prompt": "ab", "completion": "cd"}, {"prompt": "ef", "completion": "gh"}]
    path = tmp_path / f"d{suffix}"
    data = Dataset.from_list(rows)
    {".parquet": data.to_parquet, ".csv": data.to_csv, ".json": lambda p: data.to_json(p, lines=False), ".jsonl": data.to_json}[suffix](
        str(path)
    )
    examples, _ = load_examples(path, tokenizer, 64)
    want, _ = load_examples(rows, tokenizer, 64)
    assert [(e.prompt_ids, e.completion_ids) for e in examples] == [(e.prompt_ids, e.completion_ids) for e in want]
    assert examples[1].source.endswith(":2" if suffix == ".jsonl" else "row 2")


def test_dataset_folders_and_objects_load_by_split(tmp_path, tokenizer):
    from datasets import Dataset, DatasetDict

    from preft.train.data import open_dataset, pick_split

    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": "ab", "completion": "cd"}] * 3)
    write_jsonl(folder / "test.jsonl", [{"prompt": "ef", "completion": "gh"}])
    loaded = open_dataset(folder)
    assert sorted(loaded) == ["test", "train"] and len(pick_split(loaded, "train", "data")) == 3
    test, _ = load_examples(folder, tokenizer, 64, split="test")
    assert [tokenizer.decode(e.prompt_ids) for e in test] == ["ef"]
    saved = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list([{"text": "xyz"}])}).save_to_disk(str(saved))
    [ex], _ = load_examples(saved, tokenizer, 64)
    assert tokenizer.decode(ex.prompt_ids + ex.completion_ids[:-1]) == "xyz"
    with pytest.raises(DataError, match=r"no split 'validation' \(splits: \['test', 'train'\]\)"):
        pick_split(loaded, "validation", "data")


@pytest.mark.parametrize(
    "row,reason",
    [
        ({"prompt": [{"role": "user", "content": "q"}], "completion": "a string"}, "needs a conversational 'completion'"),
        ({"prompt": "q", "completion": [{"role": "assistant", "content": "a"}]}, "needs a string 'completion'"),
        ({"prompt": [{"content": "no role"}], "completion": "a"}, "'prompt' must be a non-empty string or a non-empty list"),
        ({"text": ""}, "'text' must be a non-empty string"),
    ],
)
def test_bad_trl_rows_name_the_problem(tmp_path, tokenizer, row, reason):
    with pytest.raises(DataError, match=re.escape(reason)):
        load_examples(write_jsonl(tmp_path / "bad.jsonl", [row]), tokenizer, 64)


def test_unknown_file_type_is_a_clear_error(tmp_path, tokenizer):
    (tmp_path / "d.txt").write_text("hello\n")
    with pytest.raises(DataError, match=r"unknown file type '\.txt'"):
        load_examples(tmp_path / "d.txt", tokenizer, 64)
