"""PPO learning check: oracle reward, several seeds, mean reward of the first vs the last iterations.

    python tools/run_ppo_learning.py                          # 3 seeds x 40 iterations, ~3 min on 2 cores
    python tools/run_ppo_learning.py --seeds 4 --steps 60 --out /tmp/ppo_check

Writes OUT.json (every iteration's reward per seed) and OUT.md (the table).
"""

import argparse

from fg_megatron.eval.ppo_learning import run_learning_check, write_learning_results
from fg_megatron.trainers.errors import run_cli

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=40, help="PPO iterations per seed")
    p.add_argument("--window", type=int, default=10, help="iterations averaged at each end")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", default="results/ppo_oracle_learning", help="output stem (.json/.md)")
    a = p.parse_args()
    run_cli(lambda: write_learning_results(
        run_learning_check(a.seeds, a.steps, a.window, a.nproc), a.out))
