import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from preft.hf import PreftModel, generate
from preft.train import SFTConfig, SFTTrainer, sft

from .conftest import TOY_PAIRS, write_jsonl


def toy_config(tmp_path, **kw) -> SFTConfig:
    base = dict(
        output_dir=str(tmp_path / "out"),
        r=8,
        lora_alpha=16,
        learning_rate=1e-2,
        per_device_train_batch_size=4,
        lr_scheduler_type="constant",
        disable_tqdm=True,
    )
    return SFTConfig(**{**base, **kw})


def greedy(model, tokenizer, adapter):
    prompts = [tokenizer(p)["input_ids"] for p in TOY_PAIRS]
    out = generate(model, prompts, adapter, max_new_tokens=6, eos_token_id=tokenizer.eos_token_id)
    return [tokenizer.decode(t, skip_special_tokens=True) for t in out.token_ids]


@pytest.mark.parametrize("policy", ["prefill", "all"])
def test_sft_loss_equals_hand_computed_masked_cross_entropy(tmp_path, tiny_llama, toy_sft, policy):
    trainer = SFTTrainer(tiny_llama, toy_config(tmp_path, policy=policy, max_steps=1), toy_sft)
    with torch.no_grad():  # a non-zero adapter, so a wrong mask would change the loss
        for p in trainer.params:
            p.normal_(0.0, 0.1)
    model, name = trainer.model, trainer.name

    def hand_loss(mask_policy: str) -> float:
        total, count = 0.0, 0
        for ex in trainer.examples:  # one row at a time, no padding
            P, C = len(ex.prompt_ids), len(ex.completion_ids)
            ids = torch.tensor([ex.prompt_ids + ex.completion_ids])
            mask = torch.tensor([[1.0] * P + [0.0 if mask_policy == "prefill" else 1.0] * C])
            with torch.no_grad():
                logits = model(ids, adapter_mask=mask, adapter_names=name).logits[0]
            # logits at position t predict token t + 1: completion tokens P..P+C-1 come from positions P-1..P+C-2
            total += float(F.cross_entropy(logits[P - 1 : P + C - 1], ids[0, P:], reduction="sum"))
            count += C
        return total / count

    expected, other = hand_loss(policy), hand_loss("all" if policy == "prefill" else "prefill")
    assert abs(expected - other) > 1e-3  # the check below can tell the masks apart
    loss = trainer.train().metrics[0]["loss"]
    assert loss == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("policy", ["prefill", "all"])
def test_trained_lora_adapter_makes_reference_generations_equal_targets(tmp_path, tiny_llama, toy_sft, policy):
    trainer = SFTTrainer(tiny_llama, toy_config(tmp_path, policy=policy, max_steps=60, target_modules=["all-linear"]), toy_sft)
    assert greedy(trainer.model, trainer.tokenizer, None) != list(TOY_PAIRS.values())
    result = trainer.train()
    losses = [r["loss"] for r in result.metrics]
    assert losses[-1] < 0.5 * losses[0]
    assert greedy(trainer.model, trainer.tokenizer, trainer.name) == list(TOY_PAIRS.values())
    # The saved adapter is directly servable: a fresh model loading it from disk generates the same.
    fresh = PreftModel(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32))
    adapter = fresh.load_adapter(str(result.adapter_path), "served")
    assert adapter.policy == policy
    assert greedy(fresh, trainer.tokenizer, "served") == list(TOY_PAIRS.values())
    assert (result.output_dir / "metrics.jsonl").is_file() and result.plot_path.is_file()


@pytest.mark.parametrize("kind", ["lora", "direft", "loreft"])
def test_every_adapter_kind_trains_with_prefill_policy(tmp_path, tiny_qwen3, toy_sft, kind):
    result = sft(tiny_qwen3, toy_sft, toy_config(tmp_path, adapter=kind, max_steps=25, learning_rate=2e-2))
    losses = [r["loss"] for r in result.metrics]
    assert losses[-1] < losses[0] - 1.0, losses
    assert (result.adapter_path / "adapter_model.safetensors").is_file()


def test_eval_split_logs_eval_loss(tmp_path, tiny_llama):
    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(10)]
    data = write_jsonl(tmp_path / "add.jsonl", rows)
    result = sft(tiny_llama, data, toy_config(tmp_path, max_steps=4, eval_split=0.2, eval_steps=2))
    evals = [r for r in result.metrics if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(r["eval_loss"] > 0 for r in evals)


def test_resume_gives_the_same_next_losses_as_an_uninterrupted_run(tmp_path, tiny_llama, toy_sft):
    # batch 2 of 4 rows (the data order matters) and dropout (the RNG state matters)
    kw = dict(max_steps=4, save_steps=2, per_device_train_batch_size=2, lora_dropout=0.1, lr_scheduler_type="linear")
    full = sft(tiny_llama, toy_sft, toy_config(tmp_path / "a", **kw))

    class Interrupted(Exception):
        pass

    trainer = SFTTrainer(tiny_llama, toy_config(tmp_path / "b", **kw), toy_sft)
    step = trainer.training_step

    def stop_after_two():
        if trainer.step == 2:
            raise Interrupted
        return step()

    trainer.training_step = stop_after_two
    with pytest.raises(Interrupted):
        trainer.train()
    resumed = sft(tiny_llama, toy_sft, toy_config(tmp_path / "b", resume_from_checkpoint="latest", **kw))
    by_step = lambda res: {r["step"]: r["loss"] for r in res.metrics}  # noqa: E731
    assert sorted(by_step(resumed)) == [1, 2, 3, 4]  # metrics.jsonl keeps the first run's rows
    for s in (3, 4):
        assert by_step(resumed)[s] == pytest.approx(by_step(full)[s], abs=1e-6)
    assert by_step(full)[3] != by_step(full)[2]


def test_gradient_accumulation_equals_one_big_batch(tmp_path, tiny_llama):
    # Completions of 2, 8, 3 and 5 tokens: any split into two micro-batches has unequal token counts,
    # so normalising each micro-batch by its own count would weight tokens differently.
    rows = [{"prompt": "p1", "completion": "a"}, {"prompt": "p2", "completion": "bbbbbbb"}, {"prompt": "p3", "completion": "cc"}]
    data = write_jsonl(tmp_path / "uneven.jsonl", [*rows, {"prompt": "p4", "completion": "dddd"}])
    kw = dict(max_steps=1, learning_rate=1e-2, max_grad_norm=0.0)
    big = SFTTrainer(tiny_llama, toy_config(tmp_path / "big", per_device_train_batch_size=4, **kw), data)
    small = SFTTrainer(tiny_llama, toy_config(tmp_path / "small", per_device_train_batch_size=2, gradient_accumulation_steps=2, **kw), data)
    grads = {}
    for name, trainer in (("big", big), ("small", small)):
        step = trainer.optimizer_step
        trainer.optimizer_step = lambda t=trainer, n=name, step=step: grads.setdefault(n, [p.grad.clone() for p in t.params]) and step()
    loss_big, loss_small = big.train().metrics[0]["loss"], small.train().metrics[0]["loss"]
    assert loss_big == pytest.approx(loss_small, rel=1e-6)  # float32: summed in another order, a few ulps apart (2e-7 seen)
    assert any(float(g.abs().max()) > 1e-3 for g in grads["big"])
    for a, b in zip(grads["big"], grads["small"]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_chat_messages_rows_train_the_final_assistant_turn(tmp_path, tiny_llama):
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]} for p, c in TOY_PAIRS.items()]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    trainer = SFTTrainer(tiny_llama, toy_config(tmp_path, max_steps=60), data)
    result = trainer.train()
    assert result.metrics[-1]["loss"] < 0.5 * result.metrics[0]["loss"]
    tok = trainer.tokenizer
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    # Serving tokenises the rendered chat prompt; the final assistant turn ends at <|im_end|>.
    prompts = [
        tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True))["input_ids"]
        for p in TOY_PAIRS
    ]
    out = generate(trainer.model, prompts, trainer.name, max_new_tokens=6, eos_token_id=end_of_turn)
    assert [tok.decode(t, skip_special_tokens=True) for t in out.token_ids] == list(TOY_PAIRS.values())


def test_sft_logs_trl_metric_names_with_trl_meanings(tmp_path, tiny_llama, toy_sft):
    trainer = SFTTrainer(
        tiny_llama, toy_config(tmp_path, max_steps=3, per_device_train_batch_size=2, warmup_steps=2, eval_split=0.5), toy_sft
    )
    metrics = trainer.train().metrics
    assert {"loss", "grad_norm", "learning_rate", "num_tokens", "mean_token_accuracy", "entropy", "epoch"} <= set(metrics[0])
    assert {"eval_loss", "eval_mean_token_accuracy", "eval_entropy"} <= set(metrics[-1])
    # 2 training rows, batch 2: one step per epoch; every step sees both rows' prompt + completion tokens
    per_step = sum(len(e.prompt_ids) + len(e.completion_ids) for e in trainer.examples)
    assert [r["num_tokens"] for r in metrics] == [per_step, 2 * per_step, 3 * per_step]
    assert [r["epoch"] for r in metrics] == [1.0, 2.0, 3.0]
    assert [r["learning_rate"] for r in metrics] == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2])  # --warmup_steps 2, then constant
    # mean_token_accuracy: the share of completion tokens the model's argmax predicts, before the step's update
    model, name = trainer.model, trainer.name
    batch = trainer.batch(trainer.eval_examples)
    with torch.no_grad():
        logits = model(batch.input_ids, attention_mask=batch.attention_mask, adapter_mask=batch.adapter_mask, adapter_names=name).logits
    hits = (logits[:, :-1].argmax(-1) == batch.input_ids[:, 1:]).float() * batch.completion_mask[:, 1:]
    assert metrics[-1]["eval_mean_token_accuracy"] == pytest.approx(float(hits.sum() / batch.completion_mask.sum()), abs=1e-6)
    assert 0 < metrics[0]["entropy"] < math.log(trainer.model.model.config.vocab_size) + 1e-4


@pytest.mark.parametrize("adapter", ["lora", "loreft"])
def test_gradient_checkpointing_recomputes_layers_and_gives_the_same_gradients(tmp_path, tiny_llama, toy_sft, adapter):
    grads, calls = {}, {}
    for checkpointing in (False, True):
        cfg = toy_config(
            tmp_path / str(checkpointing), adapter=adapter, max_steps=1, gradient_checkpointing=checkpointing, max_grad_norm=0.0
        )
        trainer = SFTTrainer(tiny_llama, cfg, toy_sft)
        with torch.no_grad():  # non-zero adapters (the same for both runs), so every gradient path is exercised
            torch.manual_seed(1)
            for p in trainer.params:
                p.normal_(0.0, 0.1)
        attention = trainer.model.model.model.layers[0].self_attn
        count = [0]
        attention.register_forward_hook(lambda *_, count=count: count.__setitem__(0, count[0] + 1))
        step = trainer.optimizer_step
        trainer.optimizer_step = lambda t=trainer, c=checkpointing, step=step: (
            grads.setdefault(c, [p.grad.clone() for p in t.params]) and step()
        )
        trainer.train()
        calls[checkpointing] = count[0]
    assert calls[True] > calls[False]  # the layer ran again in the backward pass
    for a, b in zip(grads[False], grads[True]):
        assert torch.allclose(a, b, atol=1e-6)
