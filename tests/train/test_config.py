"""TRL's command-line names parse to the same configs as preft's own (preft.train.config, preft.train.cli)."""

import argparse
import dataclasses

import pytest

from preft.errors import PreftError
from preft.train import GRPOConfig, SFTConfig
from preft.train.cli import add_arguments
from preft.train.config import config_from_args


def parse(argv: list[str]) -> tuple[argparse.Namespace, SFTConfig | GRPOConfig]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(argv)
    return args, config_from_args(SFTConfig if args.trainer == "sft" else GRPOConfig, args)


def test_trl_sft_flags_parse_to_the_same_config_as_preft_names():
    trl_args, trl = parse(
        "sft --model_name_or_path m --dataset_name d --use_peft --lora_r 16 --lora_alpha 32 --lora_dropout 0.05 "
        "--lora_target_modules q_proj v_proj --max_seq_length 512 --bf16 false --gradient_checkpointing true "
        "--warmup_steps 10 --eval_strategy steps --eval_steps 5 --report_to none --output_dir o".split()
    )
    preft_args, preft = parse(
        "sft --model m --dataset d --r 16 --lora_alpha 32 --lora_dropout 0.05 --target_modules q_proj v_proj "
        "--max_length 512 --no-bf16 --gradient_checkpointing --warmup_steps 10 --eval_strategy steps --eval_steps 5 --output_dir o".split()
    )
    assert dataclasses.asdict(trl) == dataclasses.asdict(preft)
    assert trl.r == 16 and trl.target_modules == ["q_proj", "v_proj"] and trl.max_length == 512 and trl.bf16 is False
    assert trl.gradient_checkpointing is True and trl_args.model == preft_args.model == "m"
    assert (trl_args.dataset_name, trl_args.dataset) == ("d", None) and (preft_args.dataset, preft_args.dataset_name) == ("d", None)


@pytest.mark.parametrize(
    "argv,want", [(["--bf16"], True), (["--bf16", "true"], True), (["--bf16", "false"], False), (["--no-bf16"], False), ([], None)]
)
def test_booleans_take_true_false_like_hf_argument_parser(argv, want):
    _, config = parse(["sft", "--dataset", "d", *argv])
    assert config.bf16 is want


def test_a_bad_boolean_is_refused():
    with pytest.raises(SystemExit):
        parse(["sft", "--dataset", "d", "--bf16", "maybe"])


def test_trl_grpo_flags_parse():
    _, config = parse(
        "grpo --dataset p --reward_funcs exact math --reward_weights 1.0 0.5 --loss_type dr_grpo "
        "--mask_truncated_completions true --scale_rewards false --num_generations 4 --per_device_train_batch_size 8".split()
    )
    assert config.reward_weights == [1.0, 0.5] and config.loss_type == "dr_grpo" and config.mask_truncated_completions is True
    assert config.scale_rewards == "none"
    for loss_type in ("grpo", "bnpo", "dapo"):
        assert parse(["grpo", "--dataset", "p", "--loss_type", loss_type])[1].loss_type == loss_type


def test_dataset_and_dataset_name_are_exclusive_and_one_is_required():
    with pytest.raises(SystemExit):
        parse(["sft", "--dataset", "a", "--dataset_name", "b"])
    with pytest.raises(SystemExit):
        parse(["sft"])


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(report_to=["wandb"]), "--report_to wandb is not supported"),
        (dict(warmup_steps=-1), "--warmup_steps must be >= 0"),
        (dict(eval_strategy="sometimes"), "--eval_strategy must be one of"),
    ],
)
def test_unsupported_sft_values_are_clear_errors(kw, message):
    with pytest.raises(PreftError, match=message):
        SFTConfig(**kw)


def test_reward_weights_must_match_the_rewards():
    with pytest.raises(PreftError, match="--reward_weights has 1 values for 2 --reward_funcs"):
        GRPOConfig(reward_funcs=["exact", "math"], reward_weights=[1.0])
    assert GRPOConfig(scale_rewards=True).scale_rewards == "group" and GRPOConfig(scale_rewards=False).scale_rewards == "none"


def test_use_peft_false_is_refused(tmp_path, capsys):
    from preft.cli import main

    assert main(["train", "sft", "--dataset", str(tmp_path / "x.jsonl"), "--use_peft", "false"]) == 2
    assert "preft trains adapters only" in capsys.readouterr().out


def test_eval_interval_follows_eval_strategy():
    assert SFTConfig(eval_steps=3).eval_interval(10) == 3  # preft's default: every eval_steps
    assert SFTConfig().eval_interval(10) == 0  # only at the end
    assert SFTConfig(eval_strategy="steps", logging_steps=4).eval_interval(10) == 4  # TRL: eval_steps defaults to logging_steps
    assert SFTConfig(eval_strategy="epoch", eval_steps=3).eval_interval(10) == 10
    assert SFTConfig(eval_strategy="no", eval_steps=3).eval_interval(10) == 0 and not SFTConfig(eval_strategy="no").evaluates


def test_warmup_steps_override_warmup_ratio():
    assert SFTConfig(warmup_ratio=0.5).warmup_updates(10) == 5
    assert SFTConfig(warmup_ratio=0.5, warmup_steps=2).warmup_updates(10) == 2
