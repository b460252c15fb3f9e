"""The server on the real SmolLM2-135M-Instruct (byte-level BPE, ChatML, eos ``<|im_end|>``), through the
official ``openai`` client against a real uvicorn server on 127.0.0.1.

Each check sends the same greedy request streamed and not streamed at once (they share the engine's
batches, which keeps the run short), and asks that the chunks add up to the non-streamed text, that
no chunk but the last is empty or holds a broken character, and that ``usage`` counts the tokenizer's
tokens. One engine for the module, short outputs: the model takes ~11 s to load on a laptop CPU.
"""

from __future__ import annotations

import asyncio

import openai
import pytest
from server_helpers import ServerThread
from transformers import AutoTokenizer

from preft.engine import LLM

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def server(smollm2_dir):
    llm = LLM(str(smollm2_dir), dtype="float32", device="cpu", num_kv_blocks=64, max_model_len=1024, max_num_seqs=8)
    server = ServerThread(llm)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    """The test's own copy: an independent reference for the server's token counts and texts."""
    return AutoTokenizer.from_pretrained(smollm2_dir)


PARIS = [{"role": "user", "content": "What is the capital of France?"}]
EMOJI = [{"role": "user", "content": "Reply only with emoji: 😀😃😄"}]
PIZZA = "I love pizza 🍕🍕"
REQUESTS = {
    "paris": dict(messages=PARIS, max_tokens=24),
    "emoji": dict(messages=EMOJI, max_tokens=8, logprobs=True, top_logprobs=2),
    "pizza": dict(prompt=PIZZA, max_tokens=8, logprobs=1),
}


def send_all(server, requests: dict[str, dict]) -> dict[str, tuple]:
    """Each greedy request sent twice, all at once: name -> (the response, its stream's chunks, usage included)."""

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300) as client:

            async def both(request: dict):
                create = client.chat.completions.create if "messages" in request else client.completions.create
                body = dict(model=server.state.model_name, temperature=0, extra_body={"return_token_ids": True}, **request)

                async def streamed():
                    return [chunk async for chunk in await create(**body, stream=True, stream_options={"include_usage": True})]

                return tuple(await asyncio.gather(create(**body), streamed()))

            results = await asyncio.gather(*(both(r) for r in requests.values()))
            return dict(zip(requests, results))

    return asyncio.run(main())


@pytest.fixture(scope="module")
def answers(server) -> dict[str, tuple]:
    return send_all(server, REQUESTS)


@pytest.fixture(scope="module")
def stopped(server, answers) -> dict[str, tuple]:
    """The chat requests again, with a stop string from their answers: a word, and two multi-byte characters."""
    emoji = answers["emoji"][0].choices[0].message.content
    return send_all(server, {"paris": {**REQUESTS["paris"], "stop": ["Paris"]}, "emoji": {**REQUESTS["emoji"], "stop": [emoji[-2:]]}})


def check_stream(chunks: list, choice, usage, chat: bool) -> list[str]:
    """The stream of one choice adds up to ``choice``; returns its text chunks."""
    *body, last = chunks
    assert not last.choices and last.usage == usage
    if chat:  # OpenAI streams the role first, in a chunk of its own
        assert body[0].choices[0].delta.role == "assistant" and not body[0].choices[0].delta.content
        body = body[1:]
    texts = [(c.choices[0].delta.content if chat else c.choices[0].text) or "" for c in body]
    whole = choice.message.content if chat else choice.text
    assert "".join(texts) == whole
    assert all(texts[:-1]), f"empty chunk while generating: {texts}"
    assert not any("\ufffd" in t for t in texts[:-1]), f"broken character sent: {texts}"
    assert [c.choices[0].finish_reason for c in body] == [None] * (len(body) - 1) + [choice.finish_reason]
    assert sum((c.choices[0].token_ids for c in body), []) == choice.token_ids
    return texts


def test_chat_answers_paris_stops_at_the_eos_and_counts_the_templated_prompt(answers, tokenizer):
    whole, chunks = answers["paris"]
    choice = whole.choices[0]
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop" and choice.token_ids[-1] == tokenizer.eos_token_id == 2 and len(choice.token_ids) < 24
    assert "<|im_end|>" not in choice.message.content and choice.message.content == tokenizer.decode(choice.token_ids[:-1])
    prompt = tokenizer.apply_chat_template(PARIS, add_generation_prompt=True, return_dict=False)
    assert choice.prompt_token_ids == prompt and tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(prompt), len(choice.token_ids))
    assert whole.usage.total_tokens == len(prompt) + len(choice.token_ids)
    check_stream(chunks, choice, whole.usage, chat=True)


def test_chat_stop_string_cuts_before_it_and_never_streams_it(answers, stopped, tokenizer):
    answer = answers["paris"][0].choices[0].message.content
    whole, chunks = stopped["paris"]
    choice = whole.choices[0]
    assert choice.message.content == answer[: answer.find("Paris")] and choice.finish_reason == "stop"
    assert "Paris" in tokenizer.decode(choice.token_ids) and len(choice.token_ids) < len(answers["paris"][0].choices[0].token_ids)
    texts = check_stream(chunks, choice, whole.usage, chat=True)
    assert not any("Par" in t for t in texts)


def test_streamed_emoji_chat_equals_the_non_streamed_text_byte_for_byte(answers, tokenizer):
    whole, chunks = answers["emoji"]
    choice = whole.choices[0]
    text = choice.message.content
    assert any(ord(ch) >= 0x1F300 for ch in text), f"no emoji in {text!r}"
    pieces = [t for t in choice.token_ids if "\ufffd" in tokenizer.decode([t])]
    assert pieces, "no emoji split over tokens: the stream checks below would prove little"
    assert text == tokenizer.decode(choice.token_ids, skip_special_tokens=True)
    texts = check_stream(chunks, choice, whole.usage, chat=True)
    assert len(texts) < len(choice.token_ids)  # pieces of a character wait for the rest of it
    # logprobs: the bytes of the tokens (pieces included) are the UTF-8 of the text, streamed or not
    content = choice.logprobs.content
    streamed = [lp for c in chunks[1:-1] for lp in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content] and all(len(e.top_logprobs) == 2 for e in content)
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)
    assert b"".join(bytes(e.bytes) for e, t in zip(content, choice.token_ids) if t != tokenizer.eos_token_id) == text.encode()


def test_stop_string_of_multibyte_characters_split_over_tokens(answers, stopped):
    text = answers["emoji"][0].choices[0].message.content
    stop = text[-2:]
    assert all(len(ch.encode()) > 1 for ch in stop)
    whole, chunks = stopped["emoji"]
    assert whole.choices[0].message.content == text[: text.find(stop)] and whole.choices[0].finish_reason == "stop"
    check_stream(chunks, whole.choices[0], whole.usage, chat=True)


def test_completion_cut_inside_an_emoji_streams_the_same_text_as_decoding_its_tokens(answers, tokenizer):
    whole, chunks = answers["pizza"]
    choice = whole.choices[0]
    assert choice.finish_reason == "length" and len(choice.token_ids) == 8
    assert "🍕" in choice.text and choice.text == tokenizer.decode(choice.token_ids)
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(tokenizer.encode(PIZZA)), 8)
    texts = check_stream(chunks, choice, whole.usage, chat=False)
    if choice.text.endswith("\ufffd"):  # the last character was cut by max_tokens: only the final flush shows it
        assert texts[-1].endswith("\ufffd")
    offsets = choice.logprobs.text_offset
    assert offsets[0] == 0 and offsets == sorted(offsets)
    for token, offset in zip(choice.logprobs.tokens, offsets):
        assert "\ufffd" in token or choice.text[offset:].startswith(token)
