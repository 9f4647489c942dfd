"""Command-line front end shared by the entry points in ``tools/``.

Every flag is a short name for a dotted config key (``--tp`` is
``parallel.tp``); ``--set key=value`` reaches any other field.  Precedence:
dataclass defaults < ``--config`` YAML < flags / ``--set`` in command-line order.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence, TypeVar

from fg_megatron.config.loader import load_config

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]


def layers_per_stage_arg(text: str) -> list[int]:
    """``--layers-per-stage 2,1``: transformer layers on each pipeline stage."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer counts such as 2,1; got {text!r}") from None


LAYERS_PER_STAGE_HELP = ("transformer layers on each pipeline stage, e.g. 2,1 (default: an fg checkpoint's own "
                         "split, else even, else the first stages get one layer more)")

# flag -> (dotted key, argparse kwargs)
COMMON_FLAGS = {
    "--tp": ("parallel.tp", dict(type=int, help="tensor-parallel size")),
    "--pp": ("parallel.pp", dict(type=int, help="pipeline-parallel size")),
    "--layers-per-stage": ("parallel.layers_per_stage", dict(type=layers_per_stage_arg, metavar="N,N,...",
                                                             help=LAYERS_PER_STAGE_HELP)),
    "--load": ("model.load", dict(help="HF directory or fg checkpoint to start from")),
    "--data": ("data.train", dict(help="training data file (JSONL or parquet)")),
    "--save": ("train.save", dict(help="output directory (checkpoints, metrics.jsonl, tb/)")),
    "--steps": ("train.steps", dict(type=int, help="optimizer steps")),
    "--seed": ("train.seed", dict(type=int, help="random seed")),
    "--lr": ("optim.lr", dict(type=float, help="peak learning rate")),
    "--global-batch-size": ("train.global_batch_size", dict(type=int, help="samples per optimizer step")),
    "--micro-batch-size": ("train.micro_batch_size", dict(type=int, help="samples per forward per DP rank")),
    "--save-every": ("train.save_every", dict(type=int, help="checkpoint every N steps (0: at the end)")),
    "--logprob-impl": ("model.logprob_impl", dict(choices=["auto", "triton", "torch", "megatron"],
                                                  help="sequence log-likelihood implementation")),
}


def _constraint_flags(section: str) -> dict:
    """The FlipGuard / KD flags of an alignment trainer's section (``dpo`` or ``ppo``)."""
    return {
        "--constraint": (f"{section}.constraint", dict(choices=["none", "kd", "flipguard"],
                                                       help="update-regression constraint")),
        "--gamma": (f"{section}.gamma", dict(type=float, help="weight of the constraint's CE term")),
        "--epsilon": (f"{section}.epsilon", dict(type=float, help="FlipGuard gate threshold")),
    }


EVAL_FLAGS = {
    "--eval-data": ("data.eval", dict(help="held-out preference file scored every --eval-every steps (eval_*)")),
    "--eval-every": ("train.eval_every", dict(type=int, help="evaluate every N steps and at the end (0: never)")),
}

PREFERENCE_FLAGS = {
    **_constraint_flags("dpo"),
    **EVAL_FLAGS,
    "--beta": ("dpo.beta", dict(type=float, help="DPO temperature")),
    "--loss-type": ("dpo.loss_type", dict(choices=["sigmoid", "ipo", "hinge"], help="DPO loss")),
    "--reference": ("dpo.reference", dict(choices=["precompute", "online"],
                                          help="reference log-probs: precomputed first pass or online")),
}

RM_FLAGS = {
    **EVAL_FLAGS,
    "--center-rewards-coefficient": ("rm.center_rewards_coefficient",
                                     dict(type=float, help="TRL's reward-centering coefficient")),
}

PPO_FLAGS = {
    **_constraint_flags("ppo"),
    "--kl-coef": ("ppo.kl_coef", dict(type=float, help="per-token KL penalty coefficient")),
    "--rollout-batch-size": ("ppo.rollout_batch_size", dict(type=int, help="prompts generated per iteration")),
    "--reward-source": ("reward.source", dict(choices=["model", "oracle"], help="reward model or the task's judge")),
}


class _Override(argparse.Action):
    """Record ``(dotted key, value)`` in command-line order."""

    def __init__(self, *args, key: str, **kwargs):
        self.key = key
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        overrides = getattr(namespace, "overrides", None) or []
        if self.key == "--set":
            overrides.append(values)
        else:
            overrides.append((self.key, values))
        namespace.overrides = overrides


def build_parser(description: str, flags: dict, default_config: Optional[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=default_config,
                        help="YAML config (defaults to the bundled tiny run)")
    for flag, (key, kwargs) in flags.items():
        parser.add_argument(flag, action=_Override, key=key, dest=f"_{key}", default=None, **kwargs)
    parser.add_argument("--resume", action=_Override, key="train.resume", nargs=0, dest="_resume",
                        help="continue from the latest checkpoint in --save")
    parser.add_argument("--overwrite", action=_Override, key="train.overwrite", nargs=0, dest="_overwrite",
                        help="start afresh in a --save that holds an earlier run's output (deleting it)")
    parser.add_argument("--allow-change", action=_Override, key="train.allow_change", dest="_allow_change",
                        metavar="FIELD", help="with --resume: let FIELD (e.g. optim.lr, or a section: dpo) differ "
                        "from the run being resumed; repeat for several")
    parser.add_argument("--set", action=_Override, key="--set", dest="_set", default=None,
                        metavar="KEY=VALUE", help="any config field by dotted name, e.g. optim.warmup_steps=10")
    return parser


def parse_run_config(cls: type[T], argv: Optional[Sequence[str]], *, description: str,
                     extra_flags: Optional[dict] = None, default_config: Optional[str] = None) -> T:
    flags = dict(COMMON_FLAGS, **(extra_flags or {}))
    parser = build_parser(description, flags, default_config)
    args = parser.parse_args(argv)
    overrides = []
    allowed: list[str] = []
    for item in getattr(args, "overrides", None) or []:
        if isinstance(item, tuple) and item[0] in ("train.resume", "train.overwrite"):
            overrides.append((item[0], True))
        elif isinstance(item, tuple) and item[0] == "train.allow_change":
            allowed.append(item[1])
        else:
            overrides.append(item)
    if allowed:
        overrides.append(("train.allow_change", allowed))
    config_path = resolve_path(args.config) if args.config else None
    return load_config(cls, config_path, overrides)


def resolve_path(path: str) -> str:
    """A path as given if it exists, else relative to the repository (bundled assets)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return str(p)
    bundled = REPO_ROOT / p
    return str(bundled) if bundled.exists() else str(p)
