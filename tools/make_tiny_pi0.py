"""Rebuild the committed tiny pi0 (assets/tiny/pi0) from the SFT split.

    python tools/make_tiny_pi0.py            # ~4 min on 2 CPU cores

Steps: random init -> torchrun tools/train_sft.py --config configs/pi0_tiny.yaml
-> fg-to-hf export.  Deterministic for a given seed and machine.
"""

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from fg_megatron.checkpoint.convert import fg_to_hf
from fg_megatron.tiny import write_init_model

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "assets/tiny/pi0"))
    p.add_argument("--save", default=str(ROOT / "runs/pi0_tiny"))
    p.add_argument("--steps", type=int, default=None)
    args = p.parse_args()
    write_init_model(ROOT / "assets/tiny/init", ROOT / "assets/tiny/tokenizer")
    shutil.rmtree(args.save, ignore_errors=True)  # a fresh run, not a resume
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
           str(ROOT / "tools/train_sft.py"), "--config", str(ROOT / "configs/pi0_tiny.yaml"),
           "--tp", str(args.tp), "--save", args.save,
           "--set", "train.keep_last=1"]
    if args.steps:
        cmd += ["--steps", str(args.steps)]
    subprocess.run(cmd, check=True, cwd=ROOT)
    latest = (Path(args.save) / "checkpoints/latest").read_text().strip()
    fg_to_hf(Path(args.save) / "checkpoints" / latest / "model", Path(args.out), force=True)
    print(f"pi0 written to {args.out}")
