"""PNG plots of evaluation results.  matplotlib is optional (the ``plot`` extra): every function
returns False, and draws nothing, when it is not installed."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:
    from fg_megatron.eval.flips import FlipReport

COLOURS = {"flip": "#d62728", "win": "#2ca02c", "tie": "#7f7f7f"}
MISSING = "matplotlib is not installed (pip install -e '.[plot]'); no plot written"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def have_matplotlib() -> bool:
    return _pyplot() is not None


def _save(fig, plt, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def flip_scatter(report: "FlipReport", path: str | Path, title: str = "") -> bool:
    """``score(pi0)`` against ``score(pi)`` per prompt (the paper's fig. 7): points below the
    diagonal band are negative flips.  Discrete scores (a 0/1 judge) are jittered and each
    cell is labelled with its count."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    values = sorted(set(report.s0) | set(report.s1))
    discrete = len(values) <= 5
    rng = random.Random(0)
    jitter = (lambda: rng.uniform(-0.12, 0.12)) if discrete else (lambda: 0.0)
    for outcome in ("tie", "win", "flip"):
        pts = [(a + jitter(), b + jitter()) for a, b, o in zip(report.s0, report.s1, report.outcomes) if o == outcome]
        if pts:
            xs, ys = zip(*pts)
            ax.scatter(xs, ys, s=12, alpha=0.6, color=COLOURS[outcome], label=f"{outcome} ({len(pts)})")
    lo, hi = min(values), max(values)
    pad = 0.25 if discrete else 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="black", lw=0.8)
    if report.margin > 0:
        for d in (-report.margin, report.margin):
            ax.plot([lo - pad, hi + pad], [lo - pad + d, hi + pad + d], color="black", lw=0.5, ls="--")
    if discrete:
        for a in values:
            for b in values:
                n = sum(1 for x, y in zip(report.s0, report.s1) if x == a and y == b)
                if n:
                    ax.annotate(str(n), (a, b), xytext=(0, 16), textcoords="offset points", ha="center",
                                fontsize=9)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel(f"score(pi0)  [{report.scorer}]")
    ax.set_ylabel("score(pi)")
    c = report.overall
    ax.set_title(f"{title + ': ' if title else ''}NFR {c.nfr:.1%}, win {c.win_rate:.1%}", fontsize=10)
    ax.legend(loc="center" if discrete else "best", fontsize=8)  # discrete: the middle is empty
    _save(fig, plt, path)
    return True


def training_curves(panels: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]], path: str | Path, *,
                    titles: Mapping[str, str] = {}, suptitle: str = "", smooth: int = 10) -> bool:
    """One panel per metric, one line per run of ``(step, value)`` points: the raw values faint,
    their running mean over ``smooth`` steps bold."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (key, runs) in zip(axes[0], panels.items()):
        for run, points in runs.items():
            if not points:
                continue
            xs, ys = zip(*points)
            avg = [sum(ys[max(0, i - smooth + 1):i + 1]) / (i + 1 - max(0, i - smooth + 1)) for i in range(len(ys))]
            line = ax.plot(xs, ys, lw=0.6, alpha=0.3)[0]
            ax.plot(xs, avg, lw=1.6, color=line.get_color(), label=run)
        ax.set_xlabel("step")
        ax.set_title(titles.get(key, key), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title=f"running mean of {smooth}", title_fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    _save(fig, plt, path)
    return True
