"""Per-step metrics: ``SAVE/metrics.jsonl`` (one object per step), TensorBoard
under ``SAVE/tb/`` and/or Weights & Biases (``train.report_to``), and a progress
line on stderr.  Rank 0 only."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from fg_megatron.parallel import get_logger

log = get_logger("train")


def _fmt_seconds(sec: float) -> str:
    sec = int(max(sec, 0))
    h, rem = divmod(sec, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricsWriter:
    def __init__(self, save_dir: Path, *, enabled: bool, tensorboard: bool, total_steps: int,
                 log_every: int = 1, resume_step: int = 0, keys: tuple[str, ...] = (),
                 report_to: Sequence[str] = ("tensorboard",), run_config: Optional[dict] = None) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.log_every = max(1, log_every)
        self.keys = keys  # shown on the progress line
        self.path = Path(save_dir) / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        self.start = time.time()
        self.start_step = resume_step
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        if "wandb" in report_to:
            import wandb  # train.report_to checked that it is installed

            # WANDB_PROJECT / WANDB_MODE (offline: no network) etc. come from the environment.
            self.wandb = wandb.init(name=Path(save_dir).name, dir=str(save_dir), config=run_config,
                                    resume="allow" if resume_step else None)
        if tensorboard and "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(Path(save_dir) / "tb"), purge_step=resume_step + 1)
            except Exception as exc:  # TensorBoard is optional at run time
                log.warning("TensorBoard disabled: %s", exc)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps the resumed run will redo."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
        self.path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                                   for k, v in metrics.items()}}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in metrics.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=step)
        if step % self.log_every == 0 or step == self.total_steps:
            self._progress(step, metrics)

    def _progress(self, step: int, metrics: dict) -> None:
        elapsed = time.time() - self.start
        done = step - self.start_step
        eta = elapsed / done * (self.total_steps - step) if done > 0 else 0.0
        parts = [f"step {step}/{self.total_steps}"]
        for k in self.keys:
            if k in metrics:
                parts.append(f"{k} {metrics[k]:.4g}")
        parts.append(f"{_fmt_seconds(elapsed)} elapsed, eta {_fmt_seconds(eta)}")
        print(" | ".join(parts), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def summary_table(title: str, rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows) if rows else 0
    lines = [title, "-" * len(title)]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines)


def first(values: list, default: Optional[float] = None):
    return values[0] if values else default
