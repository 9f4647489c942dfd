"""Does PPO learn?  The bundled task's oracle as the reward, several seeds, first vs last iterations.

    python tools/run_ppo_learning.py            # 3 seeds x 40 iterations, ~3 minutes on 2 CPU cores

Each seed runs ``tools/train_ppo.py --reward-source oracle`` (the task's judge: 1 right,
0 wrong; no learned reward model in the loop) from the committed pi0 and compares the
mean rollout reward of the first and the last ``window`` iterations.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

from fg_megatron.eval.experiment import ROOT, _shown, _torchrun, read_metrics

# The settings of the committed result (results/ppo_oracle_learning.md): the bundled PPO
# config with the oracle as reward, a larger lr than the RM default (0/1 rewards are sparse).
LEARNING_ARGS = ("--reward-source", "oracle", "--lr", "5e-4", "--kl-coef", "0.02", "--set", "ppo.critic_lr=1e-4",
                 "--set", "train.save_every=0", "--set", "train.tensorboard=false")


def run_learning_check(seeds: Sequence[int] = (1, 2, 3), steps: int = 40, window: int = 10, nproc: int = 2,
                       work_dir: str = "runs/ppo_learning", extra: Sequence[str] = (), log=print) -> dict:
    if steps < 2 * window:
        raise ValueError(f"steps={steps} must be at least twice the window ({window})")
    runs = {}
    for seed in seeds:
        save = ROOT / work_dir / f"seed{seed}"
        shutil.rmtree(save, ignore_errors=True)
        cmd, sec = _torchrun(nproc, "tools/train_ppo.py", "--steps", steps, "--seed", seed, "--save", save,
                             *LEARNING_ARGS, *extra)
        rewards = [m["reward"] for m in read_metrics(save / "metrics.jsonl")]
        first, last = sum(rewards[:window]) / window, sum(rewards[-window:]) / window
        runs[seed] = {"first": first, "last": last, "learned": last > first, "rewards": rewards,
                      "seconds": round(sec, 1), "command": _shown(cmd)}
        log(f"seed {seed}: mean reward first {window} {first:.3f} -> last {window} {last:.3f} ({sec:.0f} s)")
    return {"steps": steps, "window": window, "seeds": runs, "all_learned": all(r["learned"] for r in runs.values())}


def write_learning_results(results: dict, stem: Path | str) -> None:
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    w = results["window"]
    lines = ["# PPO learning check (oracle reward)", "",
             f"`tools/train_ppo.py` with the task's judge as the reward (1 right, 0 wrong), {results['steps']} "
             f"iterations of 32 prompts from the committed pi0; mean rollout reward of the first and the last {w} "
             "iterations. Reproduce with `python tools/run_ppo_learning.py`.", "",
             f"| seed | first {w} | last {w} | learned | seconds |", "|---|---|---|---|---|"]
    for seed, r in results["seeds"].items():
        lines.append(f"| {seed} | {r['first']:.3f} | {r['last']:.3f} | {'yes' if r['learned'] else 'no'} | "
                     f"{r['seconds']} |")
    lines += ["", "Commands:", "", "```", *[r["command"] for r in results["seeds"].values()], "```", ""]
    stem.with_suffix(".md").write_text("\n".join(lines), encoding="utf-8")
