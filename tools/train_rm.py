"""Reward-model training (Bradley-Terry, paper eq. 1) on megatron-core.

    torchrun --nproc-per-node 2 tools/train_rm.py --tp 2
    torchrun --nproc-per-node 2 tools/train_rm.py --load MODEL --data pairs.jsonl --save runs/rm --set rm.margin=true

With no arguments it trains the bundled tiny reward model (configs/rm_tiny.yaml)
from the tiny pi0 with a zero-initialised value head.  Every config field is
reachable with ``--set dotted.key=value``.
Your own --load or --data (without --config) switches to the defaults for a real
model (fg_megatron/config/schema.py) instead: --help shows the values that apply.
"""

import sys

from fg_megatron.config import RMRunConfig
from fg_megatron.config.cli import RM_FLAGS, parse_run_config
from fg_megatron.trainers.errors import run_cli
from fg_megatron.trainers.rm import main

if __name__ == "__main__":
    run_cli(lambda: main(parse_run_config(RMRunConfig, sys.argv[1:], description=__doc__,
                                          extra_flags=RM_FLAGS, default_config="configs/rm_tiny.yaml")))
