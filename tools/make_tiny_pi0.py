"""Rebuild the committed tiny pi0 (assets/tiny/pi0) from the SFT split.

    python tools/make_tiny_pi0.py            # ~8 min on 2 CPU cores (TP=1 x DP=2)

Steps: random init -> torchrun tools/train_sft.py --config configs/pi0_tiny.yaml
-> fg-to-hf export.  Deterministic for a given seed and machine.
"""

import argparse

from fg_megatron.tiny import ROOT, train_and_export, write_init_model

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--tp", type=int, default=1)  # TP=1 x DP=2: faster than TP=2 for the tiny model
    p.add_argument("--out", default=str(ROOT / "assets/tiny/pi0"))
    p.add_argument("--save", default=str(ROOT / "runs/pi0_tiny"))
    p.add_argument("--steps", type=int, default=None)
    args = p.parse_args()
    write_init_model(ROOT / "assets/tiny/init", ROOT / "assets/tiny/tokenizer")
    train_and_export("train_sft.py", "configs/pi0_tiny.yaml", args.save, args.out, nproc=args.nproc, tp=args.tp,
                     steps=args.steps)
    print(f"pi0 written to {args.out}")
