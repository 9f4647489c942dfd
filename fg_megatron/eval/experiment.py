"""The tiny flip experiment: DPO with each constraint from one pi0, judged by the tiny task's oracle.

    pi0 --generate--> pi0's responses (greedy)
    pi0 --train_dpo --constraint c--> pi_c --generate--> pi_c's responses   for c in none, kd, flipguard
    compare(pi0, pi_c) with the oracle -> accuracy, NFR, win rate (the paper's table 1 on the tiny task)
    score both with the tiny reward model -> RM-based NFR / win rate (margin 0.1, paper sec. 5.1)

Every stage is a subprocess running the public command lines (``tools/generate.py``,
``tools/train_dpo.py``, ``tools/score.py``), one torchrun at a time, with the same seed and data for
every constraint.  :func:`run_experiment` returns the result dictionary that
:func:`write_results` turns into ``.json`` / ``.md`` / ``.png``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from fg_megatron.eval.flips import compare, format_table, load_rows, write_json
from fg_megatron.eval.plots import MISSING, training_curves

ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = ("none", "kd", "flipguard")
CURVE_KEYS = ("gate_rate", "rewards_chosen")  # from each run's metrics.jsonl


@dataclass
class ExperimentSettings:
    pi0: str = "assets/tiny/pi0"
    prompts: str = "assets/tiny/data/test_prompts.jsonl"
    config: str = "configs/dpo_tiny.yaml"
    work_dir: str = "runs/flip_experiment"
    constraints: Sequence[str] = CONSTRAINTS
    nproc: int = 2
    tp: int = 1  # TP=1 x DP=2 trains the tiny model faster than TP=2 on 2 cores, with the same losses
    steps: Optional[int] = None  # None: the config's
    seed: Optional[int] = None  # None: the config's
    reward_model: Optional[str] = "assets/tiny/rm"  # scores responses for the RM-based NFR (None: skip)
    max_new_tokens: int = 24
    batch_size: int = 32
    reuse: bool = False  # keep outputs of an earlier run of the same settings (development)
    extra_train_args: Sequence[str] = field(default_factory=tuple)


def _torchrun(nproc: int, script: str, *args: str) -> tuple[list[str], float]:
    """Run a tool under torchrun from the repo root; the command and its wall time."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), script, *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return cmd, time.perf_counter() - start


def _shown(cmd: list[str]) -> str:
    """A command as a user would type it (torchrun instead of python -m torch.distributed.run)."""
    return "torchrun " + " ".join(cmd[3:]).replace(str(ROOT) + os.sep, "")


def _generate(s: ExperimentSettings, load: Path | str, out: Path) -> dict:
    if s.reuse and out.is_file():
        return {"command": None, "seconds": 0.0}
    cmd, sec = _torchrun(s.nproc, "tools/generate.py", "--load", load, "--tp", s.tp, "--prompts", s.prompts,
                         "--out", out, "--max-new-tokens", s.max_new_tokens, "--batch-size", s.batch_size)
    return {"command": _shown(cmd), "seconds": round(sec, 1)}


def _rm_scores(s: ExperimentSettings, responses: Path) -> tuple[dict, Optional[Path]]:
    """``responses`` scored by the reward model (a ``reward`` per row), or nothing without one."""
    if not s.reward_model:
        return {"command": None, "seconds": 0.0}, None
    out = responses.with_name(responses.stem + "_rm.jsonl")
    if s.reuse and out.is_file():
        return {"command": None, "seconds": 0.0}, out
    # generate.py's rows carry prompt_ids / response_ids: scored exactly as generated (EOS included)
    cmd, sec = _torchrun(s.nproc, "tools/score.py", "--load", s.reward_model, "--tp", s.tp, "--data", responses,
                         "--out", out, "--batch-size", s.batch_size)
    return {"command": _shown(cmd), "seconds": round(sec, 1)}, out


def _rm_summary(pi0_scored: Optional[Path], pi_scored: Optional[Path]) -> Optional[dict]:
    if pi0_scored is None or pi_scored is None:
        return None
    report = compare(load_rows(pi0_scored), load_rows(pi_scored), score_field="reward")
    return {k: v for k, v in report.summary().items() if k in ("nfr", "win_rate", "tie_rate", "flips", "wins",
                                                                 "margin", "score_pi0", "score_pi")}


def _train(s: ExperimentSettings, constraint: str, save: Path) -> tuple[dict, Path]:
    latest = save / "checkpoints" / "latest"
    if not (s.reuse and latest.is_file()):
        shutil.rmtree(save, ignore_errors=True)
        args = ["--config", s.config, "--tp", s.tp, "--constraint", constraint, "--save", save]
        if s.steps is not None:
            args += ["--steps", s.steps]
        if s.seed is not None:
            args += ["--seed", s.seed]
        cmd, sec = _torchrun(s.nproc, "tools/train_dpo.py", *args, *s.extra_train_args)
        info = {"command": _shown(cmd), "seconds": round(sec, 1)}
    else:
        info = {"command": None, "seconds": 0.0}
    return info, save / "checkpoints" / latest.read_text().strip() / "model"


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def refusal_rates(rows) -> dict[str, float]:
    """Share of responses that refuse, per category (the over-refusal DPO can learn)."""
    from fg_megatron.data.tiny_task import is_refusal

    by: dict[str, list[bool]] = {}
    for _, _, row in rows:
        by.setdefault(str(row.get("category", "all")), []).append(is_refusal(row.get("response", "")))
    return {g: sum(v) / len(v) for g, v in sorted(by.items())}


def run_experiment(s: ExperimentSettings, log=print) -> dict:
    """Run every stage and return the results (see :func:`write_results`)."""
    unknown = [c for c in s.constraints if c not in CONSTRAINTS]
    if unknown:
        raise ValueError(f"unknown constraint {unknown[0]!r}; choose from {', '.join(CONSTRAINTS)}")
    work = ROOT / s.work_dir
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pi0_out = work / "responses_pi0.jsonl"
    log(f"[1/{1 + len(s.constraints)}] generating pi0's responses ({s.pi0})")
    stages = {"generate_pi0": _generate(s, s.pi0, pi0_out)}
    stages["rm_score_pi0"], pi0_scored = _rm_scores(s, pi0_out)
    pi0_rows = load_rows(pi0_out)
    methods: dict[str, dict] = {}
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {k: {} for k in CURVE_KEYS}
    for n, c in enumerate(s.constraints, start=2):
        log(f"[{n}/{1 + len(s.constraints)}] DPO --constraint {c}: training, then generating")
        save = work / f"dpo_{c}"
        stages[f"train_{c}"], ckpt = _train(s, c, save)
        out = work / f"responses_{c}.jsonl"
        stages[f"generate_{c}"] = _generate(s, ckpt, out)
        stages[f"rm_score_{c}"], pi_scored = _rm_scores(s, out)
        pi_rows = load_rows(out)
        report = compare(pi0_rows, pi_rows, judge="tiny")
        log(format_table(report))
        metrics = read_metrics(save / "metrics.jsonl")
        for key in CURVE_KEYS:
            curves[key][c] = [(m["step"], m[key]) for m in metrics if key in m]
        last = metrics[-1]
        methods[c] = {**report.summary(),
                      "accuracy": report.overall.score_pi,
                      "refusal_rate_by_category": refusal_rates(pi_rows),
                      "final_metrics": {k: last.get(k) for k in ("step", "dpo_loss", "ce_loss", "gate_rate",
                                                                 "reward_accuracy", "reward_margin",
                                                                 "rewards_chosen", "logps_chosen")},
                      "mean_gate_rate": sum(m["gate_rate"] for m in metrics) / len(metrics),
                      "reward_model": _rm_summary(pi0_scored, pi_scored)}
    first = next(iter(methods.values())) if methods else None
    return {
        "settings": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in vars(s).items()},
        "pi0_accuracy": first["score_pi0"] if first else None,
        "pi0_accuracy_by_category": {g: v["score_pi0"] for g, v in first["groups"].items()} if first else {},
        "pi0_refusal_rate_by_category": refusal_rates(pi0_rows),
        "n_prompts": len(pi0_rows),
        "methods": methods,
        "curves": curves,
        "stages": stages,
        "total_seconds": round(time.perf_counter() - start, 1),
    }


def markdown_table(results: dict) -> str:
    """The paper's table 1 on the tiny task, then NFR and accuracy per category."""
    methods = results["methods"]
    lines = [f"pi0 accuracy: **{results['pi0_accuracy']:.1%}** on {results['n_prompts']} test prompts "
             f"(greedy, tiny-task oracle)", "",
             "| method | accuracy | NFR | win rate | tie rate | flips | wins | mean gate_rate | RM NFR | RM win rate |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| pi0 | {results['pi0_accuracy']:.1%} | - | - | - | - | - | - | - | - |"]
    names = {"none": "DPO", "kd": "DPO+KD", "flipguard": "DPO+FlipGuard"}
    for c, m in methods.items():
        rm = m.get("reward_model")
        rm_cells = f"{rm['nfr']:.1%} | {rm['win_rate']:.1%}" if rm else "- | -"
        lines.append(f"| {names.get(c, c)} | {m['accuracy']:.1%} | {m['nfr']:.1%} | {m['win_rate']:.1%} | "
                     f"{m['tie_rate']:.1%} | {m['flips']} | {m['wins']} | {m['mean_gate_rate']:.3f} | {rm_cells} |")
    groups = sorted(results["pi0_accuracy_by_category"])
    if groups:
        lines += ["", "Per category: accuracy (NFR / win rate)", "",
                  "| category | n | pi0 | " + " | ".join(names.get(c, c) for c in methods) + " |",
                  "|---|---|---|" + "---|" * len(methods)]
        for g in groups:
            any_m = next(iter(methods.values()))["groups"][g]
            cells = [f"{m['groups'][g]['score_pi']:.1%} ({m['groups'][g]['nfr']:.1%} / "
                     f"{m['groups'][g]['win_rate']:.1%})" for m in methods.values()]
            lines.append(f"| {g} | {any_m['n']} | {any_m['score_pi0']:.1%} | " + " | ".join(cells) + " |")
        lines += ["", "Refusal rate per category (a refusal is right only for unsafe prompts)", "",
                  "| category | pi0 | " + " | ".join(names.get(c, c) for c in methods) + " |",
                  "|---|---|" + "---|" * len(methods)]
        for g in groups:
            cells = [f"{m['refusal_rate_by_category'].get(g, 0.0):.1%}" for m in methods.values()]
            lines.append(f"| {g} | {results['pi0_refusal_rate_by_category'].get(g, 0.0):.1%} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def reading_note(results: dict) -> str:
    """How much the numbers can say: NFR is bounded by pi0's accuracy, and its sampling error."""
    n, acc = results["n_prompts"], results["pi0_accuracy"]
    nfrs = [m["nfr"] for m in results["methods"].values()]
    p = max(nfrs) if nfrs else 0.0
    se = math.sqrt(p * (1 - p) / n) if n else 0.0
    return (f"How to read it: only the {round(acc * n)} prompts pi0 answers right can flip, so NFR <= "
            f"{acc:.1%}; one flip is {1 / n:.1%} of the prompts, and the standard error of an NFR of {p:.1%} "
            f"over {n} prompts is about {se:.1%}.")


def curves_figure(results: dict, path: Path) -> bool:
    """Two panels over training steps: ``gate_rate`` and ``rewards_chosen`` per constraint."""
    titles = {"gate_rate": "gate_rate (fraction gated)",
              "rewards_chosen": "rewards_chosen = beta (logp_pi - logp_pi0)(y_c)"}
    return training_curves(results["curves"], path, titles=titles,
                           suptitle=f"DPO on the tiny task from pi0 ({results['pi0_accuracy']:.0%} accurate)")


def write_results(results: dict, stem: Path | str, log=print) -> None:
    """``stem.json`` (everything), ``stem.md`` (the tables and how to reproduce) and ``stem.png``."""
    stem = Path(stem)
    write_json(results, stem.with_suffix(".json"))
    commands = [v["command"] for v in results["stages"].values() if v.get("command")]
    cfg = results["settings"]
    md = ["# Tiny flip experiment", "",
          f"DPO with `--constraint {' | '.join(results['methods'])}` from pi0 = `{cfg['pi0']}`, same seed and "
          f"data (`{cfg['config']}`, {cfg['nproc']} processes at TP={cfg['tp']}); responses are greedy on "
          f"`{cfg['prompts']}` and judged by the tiny task's oracle. A negative flip is a prompt pi0 answered "
          "right and pi wrong. The RM columns judge the same responses by the tiny reward model "
          f"(`{cfg.get('reward_model')}`): a flip is R(pi) < R(pi0) - 0.1, a win R(pi) > R(pi0) + 0.1. "
          "Reproduce with `python tools/run_flip_experiment.py` "
          f"({results['total_seconds'] / 60:.1f} minutes on this machine).", "",
          markdown_table(results), "", reading_note(results), "",
          "![gate_rate and chosen rewards](" + stem.name + ".png)", "",
          "Commands run:", "", "```", *commands, "```", ""]
    tmp = stem.with_suffix(".md.tmp")
    tmp.write_text("\n".join(md), encoding="utf-8")
    tmp.replace(stem.with_suffix(".md"))
    if not curves_figure(results, stem.with_suffix(".png")):
        log(MISSING)
