"""Memory planning: how many bytes each pipeline stage of a training run needs on a GPU,
and whether it fits (``tools/plan_memory.py``).  Pure arithmetic over the same
architecture readers the trainers use; imports models/parallel, never trainers.
"""

from fg_megatron.planning.memory import Plan, PlanInputs, StagePlan, plan
from fg_megatron.planning.presets import PRESETS, PlanInputError, load_hf_config

__all__ = ["PRESETS", "Plan", "PlanInputError", "PlanInputs", "StagePlan", "load_hf_config", "plan"]
