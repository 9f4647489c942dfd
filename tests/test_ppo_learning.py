"""PPO learns: with the task's oracle as reward, the mean rollout reward of the last 10 of 40
iterations beats the first 10 for each of 3 seeds (the committed results/ppo_oracle_learning.md)."""

import pytest

from fg_megatron.eval.ppo_learning import run_learning_check


@pytest.mark.slow
@pytest.mark.distributed
def test_oracle_reward_rises_for_three_seeds(tmp_path):
    results = run_learning_check(seeds=(1, 2, 3), steps=40, window=10, work_dir=str(tmp_path))
    for seed, run in results["seeds"].items():
        assert len(run["rewards"]) == 40 and all(0.0 <= r <= 1.0 for r in run["rewards"])
        assert run["last"] > run["first"], (seed, run["first"], run["last"])
