"""What a resumed run may change.

A resume continues one run: every config field that changes the math (the
objective, the optimizer, the data and its order, the model and its dtype, the
reference) must equal the value the checkpoint was trained with, or the run's
metrics and ``config.yaml`` would describe two different runs as one.  Only the
fields in :data:`FREE` (how long, how often to save or log, the parallel
layout, ...) may differ silently.

A change of any other field is refused naming the field and both values,
unless the user passes ``--allow-change FIELD`` (or a whole section:
``--allow-change dpo``): then it is applied for real from the resumed step
(``optim.*`` rebuilds the lr schedule: :func:`fg_megatron.trainers.engine.apply_optim_config`)
and recorded as ``{step, field, old, new}`` in the checkpoint and in
``config.yaml``'s ``resume_history``.  A new ``train.steps`` (free, recorded the
same way) rebuilds the lr schedule for the new length: megatron-core's scheduler
built for the new number of optimizer steps, continuing at the checkpoint's
count, so the decay runs on to the new end.  The fields in :data:`FIXED` cannot
change at all: the checkpoint's tensors depend on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fg_megatron.config import ConfigError, to_dict

# Free to differ: bookkeeping, not math (the layout is checked against the checkpoint itself).
FREE = ("train.steps", "train.epochs", "train.save", "train.save_every", "train.keep_last", "train.log_every",
        "train.resume", "train.overwrite", "train.allow_change", "train.tensorboard", "train.report_to",
        "train.eval_every", "train.log_gated_ids",
        "train.micro_batch_size", "train.divergence_factor", "data.eval", "data.pad_multiple", "model.recompute",
        "model.sequence_parallel", "train.peak_tflops", "parallel", "ppo.log_reference_rollouts")
# Never changeable on resume: the saved weights and optimizer state are laid out for them.
FIXED = ("model.load", "model.head", "model.dtype", "model.vocab_pad_multiple")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}"))
    return out


def _matches(key: str, names: Any) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def config_changes(saved: dict, cfg: Any) -> list[tuple[str, Any, Any]]:
    """``(field, old, new)`` of every field whose value differs from the saved config."""
    old, new = flatten(saved), flatten(to_dict(cfg))
    # A field the checkpoint does not know (added by a later version) has its default.
    return [(k, old[k], new[k]) for k in sorted(set(old) & set(new)) if old[k] != new[k]]


def check_allow_change(cfg: Any) -> None:
    """``--allow-change`` names fields that exist (or sections) and is given with ``--resume``."""
    allowed = cfg.train.allow_change
    if not allowed:
        return
    if not cfg.train.resume:
        raise ConfigError(f"--allow-change {allowed[0]} applies to --resume only")
    known = flatten(to_dict(cfg))
    for name in allowed:
        if not any(k == name or k.startswith(name + ".") for k in known):
            raise ConfigError(f"--allow-change {name}: no such config field or section")
        if _matches(name, FIXED) or any(f.startswith(name + ".") for f in FIXED):
            raise ConfigError(f"--allow-change {name}: {', '.join(FIXED)} cannot change on resume (the checkpoint's "
                              f"tensors depend on them); start a new run from the checkpoint's model/ instead")


def resume_changes(saved: dict, cfg: Any, ckpt: Path, step: int) -> list[dict]:
    """Refuse a change that is neither free nor allowed; return the allowed and free changes
    as history records of step ``step``."""
    changes = config_changes(saved, cfg)
    refused = [c for c in changes if not _matches(c[0], FREE) and not _matches(c[0], cfg.train.allow_change)]
    if refused:
        key, old, new = refused[0]
        more = f" (and {len(refused) - 1} more: {', '.join(c[0] for c in refused[1:])})" if len(refused) > 1 else ""
        if _matches(key, FIXED):
            raise ConfigError(f"{ckpt}: {key} was {old!r} in the run being resumed, now {new!r}{more}; it cannot "
                              f"change on resume; resume with the same value or start a new --save")
        raise ConfigError(f"{ckpt}: {key} was {old!r} in the run being resumed, now {new!r}{more}; resume with the "
                          f"same value, or pass --allow-change {key} to apply the change from step {step}")
    ignored = ("train.resume", "train.overwrite", "train.allow_change", "train.save")
    return [{"step": step, "field": k, "old": o, "new": n} for k, o, n in changes if k not in ignored]


# Fields the lr schedule is built from besides optim.*: its length (PPO: train.steps x ppo.epochs x
# rollout_batch_size / global_batch_size optimizer steps) and the critic's peak lr.
SCHEDULE_FIELDS = ("train.steps", "train.global_batch_size", "ppo.epochs", "ppo.rollout_batch_size",
                   "ppo.critic_lr")


def rebuilds_schedule(history: list[dict], step: int) -> bool:
    """Whether this resume changed an optimizer setting or the run's length (the lr schedule is
    then rebuilt from the new values, continuing at the checkpoint's step count)."""
    return any(h["step"] == step and (h["field"].startswith("optim.") or h["field"] in SCHEDULE_FIELDS)
               for h in history)
