"""Rebuild the committed tiny reward model (assets/tiny/rm) from the preference split.

    python tools/make_tiny_rm.py             # ~2 min on 2 CPU cores

Steps: torchrun tools/train_rm.py --config configs/rm_tiny.yaml (the tiny pi0 with
a zero-initialised value head, Bradley-Terry on pref_train.jsonl, eval_accuracy
on pref_eval.jsonl) -> fg-to-hf export as LlamaForSequenceClassification.
Deterministic for a given seed and machine.
"""

import argparse

from fg_megatron.tiny import ROOT, train_and_export

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "assets/tiny/rm"))
    p.add_argument("--save", default=str(ROOT / "runs/rm_tiny"))
    p.add_argument("--steps", type=int, default=None)
    args = p.parse_args()
    train_and_export("train_rm.py", "configs/rm_tiny.yaml", args.save, args.out, nproc=args.nproc, tp=args.tp,
                     steps=args.steps)
    print(f"reward model written to {args.out}")
