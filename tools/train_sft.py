"""Supervised fine-tuning (cross-entropy on response tokens): how a user makes ``pi0``.

    torchrun --nproc-per-node 2 tools/train_sft.py --tp 2
    torchrun --nproc-per-node 2 tools/train_sft.py --load MODEL --data sft.jsonl --save runs/sft

With no arguments it trains the bundled tiny default (configs/sft_tiny.yaml).
Your own --load or --data (without --config) switches to the defaults for a real
model (fg_megatron/config/schema.py) instead: --help shows the values that apply.
"""

import sys

from fg_megatron.config import SFTRunConfig
from fg_megatron.config.cli import parse_run_config
from fg_megatron.trainers.errors import run_cli
from fg_megatron.trainers.sft import main

if __name__ == "__main__":
    run_cli(lambda: main(parse_run_config(SFTRunConfig, sys.argv[1:], description=__doc__,
                                          default_config="configs/sft_tiny.yaml")))
