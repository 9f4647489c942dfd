"""Command-line front end shared by the entry points in ``tools/``.

Every flag is a short name for a dotted config key (``--tp`` is
``parallel.tp``); ``--set key=value`` reaches any other field.  Precedence:
dataclass defaults < ``--config`` YAML < flags / ``--set`` in command-line order.

Which YAML a run starts from is :func:`choose_config`'s one rule: ``--config FILE``
when given; else, once the user names their own model or data (``--load`` /
``--data``), none (the dataclass defaults, sized for a real model); else the
trainer's bundled tiny config.
"""

from __future__ import annotations

import argparse
import os
import textwrap
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar

from fg_megatron.config.loader import ConfigError, load_config, to_dict

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

# Megatron-LM's names, accepted wherever a tool takes --tp / --pp (the one table of aliases).
FLAG_ALIASES = {"--tp": ("--tensor-model-parallel-size",), "--pp": ("--pipeline-model-parallel-size",)}


def option_names(flag: str) -> tuple[str, ...]:
    """``flag`` and its aliases, for ``parser.add_argument(*option_names("--tp"), ...)``."""
    return (flag, *FLAG_ALIASES.get(flag, ()))


# flag -> (dotted key, argparse kwargs)
COMMON_FLAGS = {
    "--tp": ("parallel.tp", dict(type=int, metavar="N", help="tensor-parallel size")),
    "--pp": ("parallel.pp", dict(type=int, metavar="N", help="pipeline-parallel size")),
    "--layers-per-stage": ("parallel.layers_per_stage", dict(type=layers_per_stage_arg, metavar="N,N,...",
                                                             help=LAYERS_PER_STAGE_HELP)),
    "--load": ("model.load", dict(metavar="PATH", help="HF directory or fg checkpoint to start from")),
    "--data": ("data.train", dict(metavar="FILE", help="training data file (JSONL or parquet); accepted row shapes "
                                                    "and the truncation settings: README.md, section 'Data formats'")),
    "--save": ("train.save", dict(metavar="DIR", help="output directory (checkpoints, metrics.jsonl, tb/)")),
    "--steps": ("train.steps", dict(type=int, metavar="N", help="optimizer steps")),
    "--seed": ("train.seed", dict(type=int, metavar="N", help="random seed")),
    "--lr": ("optim.lr", dict(type=float, metavar="LR", help="peak learning rate")),
    "--global-batch-size": ("train.global_batch_size", dict(type=int, metavar="N", help="samples per optimizer step")),
    "--micro-batch-size": ("train.micro_batch_size", dict(type=int, metavar="N",
                                                          help="samples per forward per DP rank")),
    "--save-every": ("train.save_every", dict(type=int, metavar="N", help="checkpoint every N steps (0: at the end)")),
    "--recompute": ("model.recompute", dict(choices=["none", "selective", "full"],
                                            help="activation recomputation of trainable models: selective "
                                                 "(core attention) or full (every layer)")),
    "--sequence-parallel": ("model.sequence_parallel", dict(nargs=0, help="Megatron sequence parallelism "
                            "(TP > 1, NCCL and Transformer Engine only; not yet verified on a GPU)")),
    "--logprob-impl": ("model.logprob_impl", dict(choices=["auto", "triton", "torch", "megatron"],
                                                  help="sequence log-likelihood implementation")),
    "--bf16": ("model.dtype", dict(nargs=0, const="bfloat16", help="short for --set model.dtype=bfloat16: on GPU, "
                                   "megatron-core mixed precision (bf16 weights, fp32 main params in the optimizer)")),
    "--fp16": ("model.dtype", dict(nargs=0, const="float16", help="short for --set model.dtype=float16: as --bf16, "
                                   "plus dynamic loss scaling (optim.initial_loss_scale)")),
}


def _constraint_flags(section: str) -> dict:
    """The FlipGuard / KD flags of an alignment trainer's section (``dpo`` or ``ppo``)."""
    return {
        "--constraint": (f"{section}.constraint", dict(choices=["none", "kd", "flipguard"],
                                                       help="update-regression constraint")),
        "--gamma": (f"{section}.gamma", dict(type=float, metavar="X", help="weight of the constraint's CE term")),
        "--epsilon": (f"{section}.epsilon", dict(type=float, metavar="X", help="FlipGuard gate threshold")),
    }


EVAL_FLAGS = {
    "--eval-data": ("data.eval", dict(metavar="FILE",
                                      help="held-out preference file scored every --eval-every steps (eval_*)")),
    "--eval-every": ("train.eval_every", dict(type=int, metavar="N",
                                              help="evaluate every N steps and at the end (0: never)")),
}

PREFERENCE_FLAGS = {
    **_constraint_flags("dpo"),
    **EVAL_FLAGS,
    "--beta": ("dpo.beta", dict(type=float, metavar="X", help="DPO temperature")),
    "--loss-type": ("dpo.loss_type", dict(choices=["sigmoid", "ipo", "hinge"], help="DPO loss")),
    "--reference": ("dpo.reference", dict(choices=["precompute", "online"],
                                          help="reference log-probs: precomputed first pass or online")),
}

RM_FLAGS = {
    **EVAL_FLAGS,
    "--center-rewards-coefficient": ("rm.center_rewards_coefficient",
                                     dict(type=float, metavar="X", help="TRL's reward-centering coefficient")),
}

PPO_FLAGS = {
    **_constraint_flags("ppo"),
    "--kl-coef": ("ppo.kl_coef", dict(type=float, metavar="X", help="per-token KL penalty coefficient")),
    "--rollout-batch-size": ("ppo.rollout_batch_size", dict(type=int, metavar="N",
                                                            help="prompts generated per iteration")),
    "--reward-source": ("reward.source", dict(choices=["model", "oracle"], help="reward model or the task's judge")),
}

# The keys that name the user's own model or data: giving one (without --config) leaves the tiny config.
USER_MODEL_KEYS = ("model.load", "data.train")
TINY_SOURCE = "bundled tiny default"
MODEL_SOURCE = "defaults for your model"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Docstring usage examples kept as written, each flag's default shown (none when it has none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == []:
            return action.help or ""
        return super()._get_help_string(action)


class _Override(argparse.Action):
    """Record ``(dotted key, value)`` in command-line order (a flag without a value: its ``const``,
    else True)."""

    def __init__(self, *args, key: str, **kwargs):
        self.key = key
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        overrides = getattr(namespace, "overrides", None) or []
        if self.key == "--set":
            overrides.append(values)
        elif self.nargs == 0:
            overrides.append((self.key, True if self.const is None else self.const))
        else:
            overrides.append((self.key, values))
        namespace.overrides = overrides


def _override_key(item: Any) -> str:
    if isinstance(item, tuple):
        return item[0]
    return str(item).split("=", 1)[0].strip()


def choose_config(config: Optional[str], overrides: Sequence[Any],
                  default_config: Optional[str]) -> tuple[Optional[str], str]:
    """The YAML a run starts from, and how to name it: ``(path or None, source)``.

    ``--config FILE`` -> FILE.  Else, when the user gives their own model or data
    (``--load`` / ``--data``, or ``--set model.load=`` / ``data.train=``) -> no file: the
    dataclass defaults (fg_megatron/config/schema.py), sized for a real model, so the tiny
    run's learning rate, lengths and steps never apply to it silently.  Else -> the tool's
    bundled tiny config (``default_config``).
    """
    if config:
        return config, config
    if default_config is None or any(_override_key(o) in USER_MODEL_KEYS for o in overrides):
        return None, MODEL_SOURCE
    return default_config, f"{TINY_SOURCE} ({default_config})"


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value) if value else "[]"
    return "none" if value is None else str(value)


def _lookup(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def build_parser(description: str, flags: dict, default_config: Optional[str], *,
                 defaults: Optional[dict] = None, source: str = "", add_help: bool = True) -> argparse.ArgumentParser:
    """``defaults``: the config tree the run would start from, shown as each flag's default."""
    epilog = None
    if source:
        epilog = textwrap.fill(f"Defaults shown: {source}.  Without --config, --load or --data a run uses the "
                               f"bundled tiny config ({default_config}); with your own --load or --data, the "
                               f"defaults for a real model (fg_megatron/config/schema.py); --config FILE always "
                               f"wins.")
    parser = argparse.ArgumentParser(description=description, epilog=epilog, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML config (default: the bundled tiny run's, unless --load or --data is given; "
                             "see below)")
    for flag, (key, kwargs) in flags.items():
        kwargs = dict(kwargs)
        if defaults is not None and kwargs.get("nargs") != 0 and key != "parallel.layers_per_stage":
            kwargs["help"] = f"{kwargs.get('help', '')} (default: {_show(_lookup(defaults, key))})"
        parser.add_argument(*option_names(flag), action=_Override, key=key, dest=f"_{key}", default=None, **kwargs)
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
                     extra_flags: Optional[dict] = None, default_config: Optional[str] = None,
                     announce: bool = True) -> T:
    """The run config from the command line; ``announce``: log its key values (rank 0)."""
    flags = dict(COMMON_FLAGS, **(extra_flags or {}))
    # First pass (no --help): which config the run starts from, so --help can show its values.
    probe, _ = build_parser(description, flags, default_config, add_help=False).parse_known_args(argv)
    config, source = choose_config(probe.config, getattr(probe, "overrides", None) or [], default_config)
    config_path = resolve_path(config) if config else None
    try:
        defaults = to_dict(load_config(cls, config_path))
    except ConfigError:
        defaults = to_dict(cls())
    args = build_parser(description, flags, default_config, defaults=defaults, source=source).parse_args(argv)
    overrides = []
    allowed: list[str] = []
    for item in getattr(args, "overrides", None) or []:
        if isinstance(item, tuple) and item[0] == "train.allow_change":
            allowed.append(item[1])
        else:
            overrides.append(item)
    if allowed:
        overrides.append(("train.allow_change", allowed))
    cfg = load_config(cls, config_path, overrides)
    if announce:
        from fg_megatron.parallel import configure_logging, get_logger

        configure_logging()
        get_logger("config").info("%s", describe_run(cfg, source))
    return cfg


def describe_run(cfg: Any, source: str) -> str:
    """The resolved config's key values, one compact block (logged at the start of every run)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    dp = world // (tp * pp) if world % (tp * pp) == 0 else "?"
    o, t, d = cfg.optim, cfg.train, cfg.data
    lengths = f"prompt <= {d.max_prompt_length}, response <= {d.max_response_length}"
    if hasattr(cfg, "ppo"):
        lengths += f", new tokens <= {cfg.ppo.max_new_tokens}"
    return "\n".join([
        f"config: {source}",
        f"  model  {cfg.model.load} ({cfg.model.dtype}) | tp={tp} pp={pp} dp={dp}",
        f"  data   {d.train} (format {d.format}) | {lengths}",
        f"  batch  global {t.global_batch_size}, micro {t.micro_batch_size} | lr {o.lr:g} {o.lr_schedule}, "
        f"warmup {o.warmup_steps}, min {o.min_lr:g}, weight decay {o.weight_decay:g} | steps {t.steps} "
        f"| save {t.save}",
    ])


def resolve_path(path: str) -> str:
    """A path as given if it exists, else relative to the repository (bundled assets)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return str(p)
    bundled = REPO_ROOT / p
    return str(bundled) if bundled.exists() else str(p)
