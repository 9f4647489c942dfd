"""The flip study: does FlipGuard lower the negative-flip rate?  Every method from one pi0, several seeds.

    python tools/run_flip_experiment.py --task assets/tiny/task --pi0 assets/tiny/pi0 \\
        --methods dpo,dpo_kd,dpo_flipguard --seeds 3 --reward-model assets/tiny/rm --out results/tiny_flip_study
    python tools/run_flip_experiment.py --task DIR --methods dpo,dpo_flipguard,ppo,ppo_flipguard \\
        --reward-model RM --seeds 3 --out results/NAME          # pi0 trained from DIR/sft.jsonl by the recipe

A task is a directory of data (fg_megatron/eval/task_dir.py): sft.jsonl (prompt,
response), pref.jsonl (prompt, chosen, rejected), test.jsonl (prompt, answer,
match: exact | contains | number | refusal).  Without --pi0, pi0 is trained by
the recipe (--pi0-recipe, an SFT config) from a random init on sft.jsonl.  Each
method trains from pi0 for each seed (DPO with --dpo-config, PPO with
--ppo-config and the reward model), then greedy responses on test.jsonl are
judged against pi0's.  DPO+FlipGuard is also swept over --gammas on seed 1.
An --out directory that already holds a report (such as the committed
results/tiny_flip_study, the default) is refused unless --force is given.
Writes OUT/report.md (table 1 as mean ± std, paired bootstrap intervals, per
category NFR and refusal rates, the gamma sweep), OUT/report.json and PNGs
(gate_rate curves; with --reward-model, R(pi0) vs R(pi) scatters).
"""

import argparse

from fg_megatron.config.cli import REPO_ROOT, HelpFormatter
from fg_megatron.eval.experiment import METHODS, StudyError, StudySettings, _check, run_study, write_report
from fg_megatron.trainers.errors import run_cli


def _gammas(text: str) -> tuple[float, ...]:
    if text == "none":
        return ()
    try:
        return tuple(float(g) for g in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers or 'none', got {text!r}") from None


def _settings(a: argparse.Namespace) -> StudySettings:
    methods = tuple(m for m in a.methods.split(",") if m)
    if not a.pi0 and not a.pi0_recipe:
        raise StudyError("give --pi0 PATH or --pi0-recipe CONFIG")
    return StudySettings(task=a.task, methods=methods, seeds=a.seeds, out=a.out, pi0=a.pi0,
                         pi0_recipe=a.pi0_recipe, dpo_config=a.dpo_config, ppo_config=a.ppo_config,
                         reward_model=None if a.reward_model in (None, "none") else a.reward_model,
                         gammas=a.gammas, work_dir=a.work_dir, nproc=a.nproc, tp=a.tp, steps=a.steps,
                         max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, reuse=a.reuse,
                         dpo_overrides=tuple(a.dpo_set), ppo_overrides=tuple(a.ppo_set))


def _say(line: str) -> None:
    print(line, flush=True)  # progress shows as it happens, even through a pipe


def main(a: argparse.Namespace) -> None:
    s = _settings(a)
    _check(s)
    out = REPO_ROOT / s.out
    if out.is_dir() and any(out.iterdir()) and not a.force:
        raise StudyError(f"--out {s.out} already holds results; pass --force to overwrite them, or another --out")
    print(f"report: {write_report(run_study(s, log=_say), log=_say)}")


if __name__ == "__main__":
    d = StudySettings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--task", default=d.task, metavar="DIR", help="task directory (sft/pref/test .jsonl)")
    p.add_argument("--methods", default=",".join(d.methods), help=f"comma-separated: {', '.join(METHODS)}")
    p.add_argument("--seeds", type=int, default=d.seeds, metavar="N", help="seeds 1..N per method")
    p.add_argument("--out", default=d.out, metavar="DIR", help="report directory (an existing one needs --force)")
    p.add_argument("--force", action="store_true", help="overwrite the results already in --out")
    p.add_argument("--pi0", default=None, metavar="PATH",
                   help="pi0 (HF directory or fg checkpoint); default: the recipe")
    p.add_argument("--pi0-recipe", default=d.pi0_recipe, metavar="FILE",
                   help="SFT config that makes pi0 when --pi0 is absent")
    p.add_argument("--dpo-config", default=d.dpo_config, metavar="FILE", help="config of every DPO run")
    p.add_argument("--ppo-config", default=d.ppo_config, metavar="FILE", help="config of every PPO run")
    p.add_argument("--reward-model", default=None, metavar="PATH", help="RM for the RM-based NFR and PPO's reward")
    p.add_argument("--gammas", type=_gammas, default=",".join(f"{g:g}" for g in d.gammas), metavar="G,G,...",
                   help="DPO+FlipGuard gamma sweep on seed 1 ('none' to skip)")
    p.add_argument("--work-dir", default=d.work_dir, metavar="DIR", help="intermediate checkpoints and responses")
    p.add_argument("--nproc", type=int, default=d.nproc, metavar="N", help="processes per torchrun")
    p.add_argument("--tp", type=int, default=d.tp, metavar="N", help="tensor-parallel size of every run")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="override every config's train.steps (quick runs)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, metavar="N",
                   help="response budget when generating")
    p.add_argument("--batch-size", type=int, default=d.batch_size, metavar="N", help="generation batch size")
    p.add_argument("--dpo-set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every DPO run (repeatable), e.g. dpo.beta=0.2")
    p.add_argument("--ppo-set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every PPO run (repeatable), e.g. ppo.rollout_batch_size=16")
    p.add_argument("--reuse", action="store_true", help="keep outputs already in --work-dir")
    a = p.parse_args()
    run_cli(lambda: main(a))
