"""fg_megatron: megatron-core DPO/PPO with the FlipGuard constraint against update regression."""

__version__ = "0.1.0"
