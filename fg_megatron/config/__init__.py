"""Typed configs (dataclasses) <- YAML <- CLI overrides."""

from fg_megatron.config.loader import ConfigError, load_config, parse_override, save_config, to_dict
from fg_megatron.config.schema import (
    DataConfig,
    DPOConfig,
    DPORunConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    PPOConfig,
    PPORunConfig,
    RewardConfig,
    RMConfig,
    RMRunConfig,
    SFTConfig,
    SFTRunConfig,
    TrainConfig,
)

__all__ = [
    "ConfigError", "load_config", "parse_override", "save_config", "to_dict",
    "DataConfig", "DPOConfig", "DPORunConfig", "ModelConfig", "OptimConfig", "ParallelConfig", "PPOConfig", "PPORunConfig", "RewardConfig",
    "RMConfig", "RMRunConfig", "SFTConfig", "SFTRunConfig", "TrainConfig",
]
