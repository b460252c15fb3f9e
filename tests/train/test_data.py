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
