"""fg_megatron: megatron-core DPO/PPO with the FlipGuard constraint against update regression."""

__version__ = "0.1.0"

# Applies the platform's warning filters before anything imports megatron-core.
from fg_megatron import platform as _platform  # noqa: E402,F401
