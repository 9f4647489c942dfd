"""DPO (+ FlipGuard / KD) on megatron-core.

    torchrun --nproc-per-node 2 tools/train_dpo.py --tp 2
    torchrun --nproc-per-node 4 tools/train_dpo.py --config configs/dpo_tiny.yaml --tp 2 --constraint kd

With no arguments it trains the bundled tiny default (configs/dpo_tiny.yaml).
Every config field is reachable with ``--set dotted.key=value``.
Your own --load or --data (without --config) switches to the defaults for a real
model (fg_megatron/config/schema.py) instead: --help shows the values that apply.
"""

import sys

from fg_megatron.config import DPORunConfig
from fg_megatron.config.cli import PREFERENCE_FLAGS, parse_run_config
from fg_megatron.trainers.dpo import main
from fg_megatron.trainers.errors import run_cli

if __name__ == "__main__":
    run_cli(lambda: main(parse_run_config(DPORunConfig, sys.argv[1:], description=__doc__,
                                          extra_flags=PREFERENCE_FLAGS, default_config="configs/dpo_tiny.yaml")))
