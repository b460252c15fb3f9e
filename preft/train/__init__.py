"""Training prefill-only adapters with the serving semantics: SFT and GRPO (``preft train sft|grpo``).

Python API::

    from preft.train import SFTConfig, sft, GRPOConfig, grpo
    result = sft("path/to/model", "train.jsonl", SFTConfig(adapter="lora", policy="prefill", max_steps=100))
    result.adapter_path  # a servable adapter directory
    users = sft("path/to/model", "users.jsonl", SFTConfig(output_dir="runs/users"))  # rows name their user
    users.adapters["alice"]  # runs/users/alice/, one servable adapter per user
"""

from preft.train.config import GRPOConfig, SFTConfig, TrainConfig
from preft.train.data import DataError
from preft.train.grpo import GRPOTrainer, grpo
from preft.train.multi_user import MultiUserSFTTrainer, UsersResult, sft_users
from preft.train.sft import SFTTrainer, sft
from preft.train.trainer import TrainResult, token_logprobs

__all__ = [
    "DataError",
    "GRPOConfig",
    "GRPOTrainer",
    "MultiUserSFTTrainer",
    "SFTConfig",
    "SFTTrainer",
    "TrainConfig",
    "TrainResult",
    "UsersResult",
    "grpo",
    "sft",
    "sft_users",
    "token_logprobs",
]
