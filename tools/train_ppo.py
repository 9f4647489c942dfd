"""PPO with the FlipGuard constraint (paper eq. 2 and 7) on megatron-core.

    torchrun --nproc-per-node 2 tools/train_ppo.py --tp 2
    torchrun --nproc-per-node 2 tools/train_ppo.py --constraint none --set reward.source=oracle

Four models: the actor (from pi0), the critic (from the reward model by default),
the frozen reference pi0 and the frozen reward model.  ``train.steps`` counts
PPO iterations (a rollout, then ``ppo.epochs`` passes over it).  With no
arguments it trains the bundled tiny default (configs/ppo_tiny.yaml).  Every
config field is reachable with ``--set dotted.key=value``.
Your own --load or --data (without --config) switches to the defaults for a real
model (fg_megatron/config/schema.py) instead: --help shows the values that apply.
"""

import sys

from fg_megatron.config import PPORunConfig
from fg_megatron.config.cli import PPO_FLAGS, parse_run_config
from fg_megatron.trainers.errors import run_cli
from fg_megatron.trainers.ppo import main

if __name__ == "__main__":
    run_cli(lambda: main(parse_run_config(PPORunConfig, sys.argv[1:], description=__doc__,
                                          extra_flags=PPO_FLAGS, default_config="configs/ppo_tiny.yaml")))
