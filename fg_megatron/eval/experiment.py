"""The flip study: every method from one pi0, several seeds, judged on a task's held-out prompts.

    task DIR (sft / pref / test .jsonl, :mod:`fg_megatron.eval.task_dir`)
    pi0 = --pi0, or the recipe: random init -> train_sft.py (--pi0-recipe) on DIR/sft.jsonl
    pi0 --generate--> pi0's greedy responses on DIR/test.jsonl
    for seed in 1..N, for each method (dpo, dpo_kd, dpo_flipguard, ppo, ppo_kd, ppo_flipguard):
        pi0 --train_dpo / train_ppo --constraint c --seed s--> pi --generate--> pi's responses
        judge both by the test rows' answer / match -> accuracy, NFR, win rate (paper table 1)
    gamma sweep: dpo_flipguard on seed 1 for each --gammas value
    with --reward-model: both responses scored by it -> RM-based NFR (margin 0.1) and the fig. 7 scatter

Every stage is a subprocess running the public command lines (``tools/generate.py``,
``tools/train_*.py``, ``tools/score.py``), one torchrun at a time.  :func:`run_study`
returns the result dictionary that :func:`write_report` turns into ``report.json`` /
``report.md`` / PNGs.  The statistics (mean +- std over seeds, a paired bootstrap over
prompts) are pure functions below.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from fg_megatron.config import ConfigError
from fg_megatron.eval.flips import FlipReport, compare, load_rows, write_json
from fg_megatron.eval.plots import MISSING, flip_scatter, training_curves
from fg_megatron.eval.task_dir import TaskDir, load_task

ROOT = Path(__file__).resolve().parents[2]
# method -> (trainer, constraint)
METHODS = {"dpo": ("dpo", "none"), "dpo_kd": ("dpo", "kd"), "dpo_flipguard": ("dpo", "flipguard"),
           "ppo": ("ppo", "none"), "ppo_kd": ("ppo", "kd"), "ppo_flipguard": ("ppo", "flipguard")}
NAMES = {"dpo": "DPO", "dpo_kd": "DPO+KD", "dpo_flipguard": "DPO+FlipGuard",
         "ppo": "PPO", "ppo_kd": "PPO+KD", "ppo_flipguard": "PPO+FlipGuard"}
GAMMAS = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1)  # the sweep and the bundled config's 0.1
BOOTSTRAP_SAMPLES = 2000
GOAL_NFR_RATIO, GOAL_WIN_DROP = 0.85, 0.01  # the goal: NFR(FG) <= 0.85 NFR(base), win rate >= base - 1 pt


class StudyError(ConfigError):
    """Settings the study cannot run with (one line, exit 2 through run_cli)."""


@dataclass
class StudySettings:
    task: str = "assets/tiny/task"
    methods: Sequence[str] = ("dpo", "dpo_kd", "dpo_flipguard")
    seeds: int = 3
    out: str = "results/tiny_flip_study"
    pi0: Optional[str] = None  # None: trained by the recipe from DIR/sft.jsonl
    pi0_recipe: str = "configs/pi0_tiny.yaml"
    tokenizer: str = "assets/tiny/tokenizer"  # the recipe's tokenizer, unless DIR/tokenizer exists
    dpo_config: str = "configs/dpo_tiny.yaml"
    ppo_config: str = "configs/ppo_tiny.yaml"
    reward_model: Optional[str] = None  # RM-based NFR and PPO's reward (PPO needs one)
    gammas: Sequence[float] = GAMMAS  # DPO+FlipGuard sweep on seed 1 (empty: none)
    work_dir: str = "runs/flip_study"
    nproc: int = 2
    tp: int = 1  # TP=1 x DP=2 trains the tiny model faster than TP=2 on 2 cores, with the same losses
    steps: Optional[int] = None  # None: each config's
    max_new_tokens: int = 24
    batch_size: int = 32
    reuse: bool = False  # keep outputs of an earlier run with the same settings (development)
    dpo_overrides: Sequence[str] = ()  # KEY=VALUE, passed as --set to every DPO run
    ppo_overrides: Sequence[str] = ()  # KEY=VALUE, passed as --set to every PPO run


# ---- subprocesses -------------------------------------------------------------------------------

def _torchrun(nproc: int, script: str, *args: str) -> tuple[list[str], float]:
    """Run a tool under torchrun from the repo root; the command and its wall time.  A failure is
    one line naming the command and its last error line; the whole output goes to a log file."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), script, *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        log = Path(tempfile.mkstemp(prefix="fg_stage_", suffix=".log")[1])
        log.write_text(f"{' '.join(cmd)}\n\n{proc.stdout}\n{proc.stderr}", encoding="utf-8")
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        cause = next((ln for ln in reversed(lines) if ln.startswith(("error:", "[rank0]: error:"))), None) or next(
            (ln for ln in reversed(lines) if "Error:" in ln and "ChildFailedError" not in ln), "see the log")
        raise StudyError(f"{_shown(cmd)} failed (exit {proc.returncode}): {cause} (output: {log})")
    return cmd, time.perf_counter() - start


def _shown(cmd: list[str]) -> str:
    """A command as a user would type it (torchrun instead of python -m torch.distributed.run)."""
    return "torchrun " + " ".join(cmd[3:]).replace(str(ROOT) + os.sep, "")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _stage(commands: list, cmd: list[str], seconds: float) -> None:
    commands.append({"command": _shown(cmd), "seconds": round(seconds, 1)})


class _Runner:
    """The study's stages, each skipped under ``reuse`` when its output exists."""

    def __init__(self, s: StudySettings, task: TaskDir, log: Callable[[str], None]):
        self.s, self.task, self.log = s, task, log
        self.work = (ROOT / s.work_dir).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.commands: list[dict] = []

    def pi0(self) -> str:
        if self.s.pi0:
            return self.s.pi0
        from fg_megatron.checkpoint.convert import fg_to_hf
        from fg_megatron.tiny import write_init_model

        out, save = self.work / "pi0", self.work / "pi0_sft"
        if self.s.reuse and (out / "config.json").is_file():
            return str(out)
        tokenizer = self.task.root / "tokenizer" if (self.task.root / "tokenizer").is_dir() else ROOT / self.s.tokenizer
        init = write_init_model(self.work / "pi0_init", tokenizer)
        shutil.rmtree(save, ignore_errors=True)
        args = ["--config", self.s.pi0_recipe, "--tp", self.s.tp, "--load", init, "--data", self.task.sft,
                "--save", save, "--set", "train.keep_last=1", "--set", "train.save_every=0"]
        if self.s.steps is not None:
            args += ["--steps", self.s.steps]
        self.log(f"pi0: SFT from a random init on {self.task.sft} ({self.s.pi0_recipe})")
        _stage(self.commands, *_torchrun(self.s.nproc, "tools/train_sft.py", *args))
        latest = (save / "checkpoints/latest").read_text().strip()
        fg_to_hf(save / "checkpoints" / latest / "model", out, force=True)
        return str(out)

    def generate(self, load: str, out: Path) -> Path:
        if not (self.s.reuse and out.is_file()):
            _stage(self.commands, *_torchrun(
                self.s.nproc, "tools/generate.py", "--load", load, "--tp", self.s.tp, "--prompts", self.task.test,
                "--out", out, "--max-new-tokens", self.s.max_new_tokens, "--batch-size", self.s.batch_size))
        return out

    def rm_score(self, responses: Path) -> Optional[Path]:
        if not self.s.reward_model:
            return None
        out = responses.with_name(responses.stem + "_rm.jsonl")
        if not (self.s.reuse and out.is_file()):
            # generate.py's rows carry prompt_ids / response_ids: scored exactly as generated (EOS included)
            _stage(self.commands, *_torchrun(self.s.nproc, "tools/score.py", "--load", self.s.reward_model, "--tp",
                                             self.s.tp, "--data", responses, "--out", out, "--batch-size",
                                             self.s.batch_size))
        return out

    def train(self, method: str, seed: int, pi0: str, save: Path, extra: Sequence[str] = ()) -> Path:
        trainer, constraint = METHODS[method]
        latest = save / "checkpoints" / "latest"
        if not (self.s.reuse and latest.is_file()):
            shutil.rmtree(save, ignore_errors=True)
            config = self.s.dpo_config if trainer == "dpo" else self.s.ppo_config
            args = ["--config", config, "--tp", self.s.tp, "--constraint", constraint, "--seed", seed,
                    "--load", pi0, "--data", self.task.pref, "--save", save, "--set", "train.keep_last=1",
                    "--set", "train.save_every=0"]
            if trainer == "ppo":
                args += ["--set", "reward.source=model", "--set", f"reward.load={self.s.reward_model}"]
            for override in self.s.dpo_overrides if trainer == "dpo" else self.s.ppo_overrides:
                args += ["--set", override]
            if self.s.steps is not None:
                args += ["--steps", self.s.steps]
            _stage(self.commands, *_torchrun(self.s.nproc, f"tools/train_{trainer}.py", *args, *extra))
        return save / "checkpoints" / latest.read_text().strip() / "model"


# ---- statistics (pure) ------------------------------------------------------------------------

def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def paired_bootstrap(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], *,
                     samples: int = BOOTSTRAP_SAMPLES, seed: int = 0, level: float = 0.95) -> dict:
    """Mean over seeds of ``mean(a[s]) - mean(b[s])`` and its percentile interval, resampling the
    prompts (the same draw for both methods and every seed: the comparison is paired).

    ``a[s][i]``: per-prompt value (1 = flip, say) of method A in seed ``s``.
    """
    if len(a) != len(b) or not a or any(len(x) != len(a[0]) or len(y) != len(a[0]) for x, y in zip(a, b)):
        raise ValueError("paired bootstrap needs equally many seeds and prompts for both methods")
    n, k = len(a[0]), len(a)
    diff = [sum(a[s][i] - b[s][i] for s in range(k)) / k for i in range(n)]  # per prompt, mean over seeds
    rng = random.Random(seed)
    stats = sorted(sum(diff[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    lo = stats[int(math.floor((1 - level) / 2 * samples))]
    hi = stats[min(samples - 1, int(math.ceil((1 + level) / 2 * samples)) - 1)]
    return {"difference": sum(diff) / n, "low": lo, "high": hi, "level": level, "samples": samples}


def _indicators(report: FlipReport, outcome: str) -> list[float]:
    return [1.0 if o == outcome else 0.0 for o in report.outcomes]


# ---- the study --------------------------------------------------------------------------------

def _check(s: StudySettings) -> None:
    unknown = [m for m in s.methods if m not in METHODS]
    if unknown:
        raise StudyError(f"--methods: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if not s.methods:
        raise StudyError("--methods: give at least one method")
    if s.seeds < 1:
        raise StudyError(f"--seeds must be >= 1, got {s.seeds}")
    if any(METHODS[m][0] == "ppo" for m in s.methods) and not s.reward_model:
        raise StudyError("PPO methods need --reward-model (their reward and critic)")
    if any(not (isinstance(g, (int, float)) and math.isfinite(g) and g >= 0) for g in s.gammas):
        raise StudyError(f"--gammas must be finite and >= 0, got {list(s.gammas)}")


def study_command(s: StudySettings) -> str:
    """The command line that reruns these settings."""
    d = StudySettings()
    parts = ["python tools/run_flip_experiment.py", f"--task {s.task}", f"--methods {','.join(s.methods)}",
             f"--seeds {s.seeds}", f"--out {s.out}"]
    parts += [f"--pi0 {s.pi0}"] if s.pi0 else []
    for name in ("pi0_recipe", "dpo_config", "ppo_config", "reward_model", "work_dir", "nproc", "tp", "steps",
                 "max_new_tokens", "batch_size"):
        if getattr(s, name) != getattr(d, name):
            parts.append(f"--{name.replace('_', '-')} {getattr(s, name)}")
    parts += [f"--dpo-set {o}" for o in s.dpo_overrides] + [f"--ppo-set {o}" for o in s.ppo_overrides]
    if tuple(s.gammas) != tuple(d.gammas):
        parts.append(f"--gammas {','.join(f'{g:g}' for g in s.gammas) or 'none'}")
    return " ".join(parts)


def _config_gamma(path: str) -> float:
    from fg_megatron.config import load_config
    from fg_megatron.config.schema import DPORunConfig

    return float(load_config(DPORunConfig, ROOT / path).dpo.gamma)


def refusal_rates(rows) -> dict[str, float]:
    """Share of responses that refuse, per category (``all`` without categories): the over-refusal
    an unconstrained policy learns shows up here."""
    from fg_megatron.data.answers import is_refusal

    by: dict[str, list[bool]] = {}
    for _, _, row in rows:
        by.setdefault(str(row.get("category", "all")), []).append(is_refusal(row.get("response", "")))
    return {g: sum(v) / len(v) for g, v in sorted(by.items())}


def _run_summary(report: FlipReport, rows, metrics: list[dict], rm: Optional[FlipReport]) -> dict:
    gates = [m["gate_rate"] for m in metrics if m.get("gate_rate") is not None]
    return {**{k: v for k, v in report.summary().items() if k not in ("flip_ids", "win_ids")},
            "accuracy": report.overall.score_pi,
            "refusal_rate_by_category": refusal_rates(rows),
            "mean_gate_rate": sum(gates) / len(gates) if gates else None,
            "gate_rate_curve": [(m["step"], m["gate_rate"]) for m in metrics if m.get("gate_rate") is not None],
            "flip": _indicators(report, "flip"), "win": _indicators(report, "win"),
            "reward_model": None if rm is None else {k: rm.summary()[k] for k in
                                                     ("nfr", "win_rate", "tie_rate", "flips", "wins", "margin",
                                                      "score_pi0", "score_pi")}}


def run_study(s: StudySettings, log: Callable[[str], None] = print) -> dict:
    """Run every stage and return the results (see :func:`write_report`)."""
    _check(s)
    task = load_task(ROOT / s.task, need_sft=not s.pi0)
    start = time.perf_counter()
    r = _Runner(s, task, log)
    pi0 = r.pi0()
    log(f"pi0 = {pi0}: generating its responses on {task.test}")
    pi0_out = r.generate(pi0, r.work / "responses_pi0.jsonl")
    pi0_rows = load_rows(pi0_out)
    pi0_rm = r.rm_score(pi0_out)
    runs: dict[str, list[dict]] = {m: [] for m in s.methods}
    scatter: dict[str, FlipReport] = {}

    def evaluate(method: str, seed: int, save: Path, ckpt: Path, tag: str) -> dict:
        out = r.generate(str(ckpt), r.work / f"responses_{tag}.jsonl")
        rows = load_rows(out)
        report = compare(pi0_rows, rows, judge="task")
        rm_out = r.rm_score(out)
        rm = None if rm_out is None else compare(load_rows(pi0_rm), load_rows(rm_out), score_field="reward")
        if rm is not None and seed == 1 and tag == f"{method}_s1":
            scatter[method] = rm
        log(f"  {NAMES[method]} seed {seed}: accuracy {report.overall.score_pi:.1%}, NFR {report.overall.nfr:.1%}, "
            f"win {report.overall.win_rate:.1%}")
        return {"seed": seed, **_run_summary(report, rows, read_metrics(save / "metrics.jsonl"), rm)}

    total = s.seeds * len(s.methods)
    for seed in range(1, s.seeds + 1):
        for method in s.methods:
            log(f"[{len(sum(runs.values(), [])) + 1}/{total}] {NAMES[method]}, seed {seed}: training, generating")
            save = r.work / f"{method}_s{seed}"
            runs[method].append(evaluate(method, seed, save, r.train(method, seed, pi0, save), f"{method}_s{seed}"))
    sweep: list[dict] = []
    if s.gammas:
        base_gamma = _config_gamma(s.dpo_config)
        for gamma in s.gammas:
            if "dpo_flipguard" in runs and gamma == base_gamma:
                sweep.append({"gamma": gamma, **runs["dpo_flipguard"][0]})
                continue
            log(f"gamma sweep: DPO+FlipGuard, gamma {gamma:g}, seed 1")
            save = r.work / f"dpo_flipguard_g{gamma:g}_s1"
            ckpt = r.train("dpo_flipguard", 1, pi0, save, extra=["--gamma", str(gamma)])
            sweep.append({"gamma": gamma, **evaluate("dpo_flipguard", 1, save, ckpt, f"dpo_flipguard_g{gamma:g}_s1")})
    pi0_report = compare(pi0_rows, pi0_rows, judge="task")
    results = {
        "settings": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in asdict(s).items()},
        "pi0": pi0,
        "n_prompts": len(pi0_rows),
        "pi0_accuracy": pi0_report.overall.score_pi0,
        "pi0_accuracy_by_category": {g: c.score_pi0 for g, c in pi0_report.groups.items()},
        "pi0_refusal_rate_by_category": refusal_rates(pi0_rows),
        "command": study_command(s),
        "runs": runs,
        "gamma_sweep": sweep,
        "commands": r.commands,
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    results["summary"] = summarise(results)
    results["_scatter"] = scatter
    return results


def summarise(results: dict) -> dict:
    """Mean +- std over seeds per method, per category, and the paired bootstrap comparisons."""
    table = {}
    for method, runs in results["runs"].items():
        row = {}
        for key in ("accuracy", "nfr", "win_rate", "tie_rate"):
            row[key] = mean_std([run[key] for run in runs])
        rms = [run["reward_model"] for run in runs if run.get("reward_model")]
        if rms:
            row["rm_nfr"] = mean_std([x["nfr"] for x in rms])
            row["rm_win_rate"] = mean_std([x["win_rate"] for x in rms])
        gates = [run["mean_gate_rate"] for run in runs if run.get("mean_gate_rate") is not None]
        row["mean_gate_rate"] = mean_std(gates) if gates else None
        row["nfr_by_category"] = {g: mean_std([run["groups"][g]["nfr"] for run in runs])
                                  for g in sorted(runs[0]["groups"])}
        row["refusal_rate_by_category"] = {g: mean_std([run["refusal_rate_by_category"][g] for run in runs])
                                           for g in sorted(runs[0]["refusal_rate_by_category"])}
        table[method] = row
    comparisons = {}
    for trainer in ("dpo", "ppo"):
        for other in ("flipguard", "kd"):
            a, b = f"{trainer}_{other}", trainer
            if a in results["runs"] and b in results["runs"]:
                ra, rb = results["runs"][a], results["runs"][b]
                nfr = paired_bootstrap([x["flip"] for x in ra], [x["flip"] for x in rb])
                win = paired_bootstrap([x["win"] for x in ra], [x["win"] for x in rb])
                base = table[b]["nfr"][0]
                comparisons[f"{a} vs {b}"] = {
                    "nfr_difference": nfr, "win_rate_difference": win,
                    "nfr_ratio": table[a]["nfr"][0] / base if base else None,
                    "meets_goal": bool(base and table[a]["nfr"][0] <= GOAL_NFR_RATIO * base
                                       and table[a]["win_rate"][0] >= table[b]["win_rate"][0] - GOAL_WIN_DROP)}
    return {"methods": table, "comparisons": comparisons}


# ---- the report -------------------------------------------------------------------------------

def _pm(ms: Optional[tuple[float, float]], pct: bool = True) -> str:
    if ms is None:
        return "-"
    m, s = ms
    return f"{100 * m:.1f} ± {100 * s:.1f}" if pct else f"{m:.3f} ± {s:.3f}"


def _ci(d: dict) -> str:
    return f"{100 * d['difference']:+.1f} pts [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"


def markdown_report(results: dict) -> str:
    s, summ = results["settings"], results["summary"]
    seeds = s["seeds"]
    has_rm = any("rm_nfr" in row for row in summ["methods"].values())
    lines = ["# Flip study", "",
             f"Task `{s['task']}` ({results['n_prompts']} test prompts), pi0 `{results['pi0']}` "
             f"(accuracy **{100 * results['pi0_accuracy']:.1f}%**, greedy). Each method trains from pi0 on the "
             f"task's pairs with seeds 1-{seeds} ("
             + ", ".join(f"`{s[k + '_config']}`" for k in ("dpo", "ppo") if any(METHODS[m][0] == k for m in results["runs"]))
             + f"; {s['nproc']} processes at TP={s['tp']}); greedy responses are judged by each test row's "
             "`answer` / `match`. A negative flip is a prompt pi0 answered right and pi answers wrong; rates are "
             f"% of all prompts, mean ± std over {seeds} seeds.", "",
             "| method | accuracy | NFR | win rate | tie rate | mean gate_rate"
             + (" | RM NFR | RM win rate" if has_rm else "") + " |",
             "|---|---|---|---|---|---" + ("|---|---" if has_rm else "") + "|",
             f"| pi0 | {100 * results['pi0_accuracy']:.1f} | - | - | - | -" + (" | - | -" if has_rm else "") + " |"]
    for method, row in summ["methods"].items():
        cells = [_pm(row[k]) for k in ("accuracy", "nfr", "win_rate", "tie_rate")]
        cells.append(_pm(row["mean_gate_rate"], pct=False))
        if has_rm:
            cells += [_pm(row.get("rm_nfr")), _pm(row.get("rm_win_rate"))]
        lines.append(f"| {NAMES[method]} | " + " | ".join(cells) + " |")
    if summ["comparisons"]:
        lines += ["", f"Paired bootstrap over prompts ({BOOTSTRAP_SAMPLES} resamples, the same prompts for both "
                  "methods and all seeds), difference of the seed means with its 95% interval:", "",
                  "| comparison | NFR difference | win-rate difference | NFR ratio | goal (ratio <= 0.85, win >= base - 1 pt) |",
                  "|---|---|---|---|---|"]
        for name, c in summ["comparisons"].items():
            a, b = name.split(" vs ")
            ratio = "-" if c["nfr_ratio"] is None else f"{c['nfr_ratio']:.2f}"
            lines.append(f"| {NAMES[a]} - {NAMES[b]} | {_ci(c['nfr_difference'])} | {_ci(c['win_rate_difference'])} "
                         f"| {ratio} | {'met' if c['meets_goal'] else 'not met'} |")
    cats = sorted(next(iter(summ["methods"].values()))["nfr_by_category"])
    if cats:
        lines += ["", "NFR per category (% of the category's prompts, mean ± std):", "",
                  "| category | pi0 accuracy | " + " | ".join(NAMES[m] for m in summ["methods"]) + " |",
                  "|---|---|" + "---|" * len(summ["methods"])]
        for g in cats:
            acc = results["pi0_accuracy_by_category"].get(g)
            lines.append(f"| {g} | {'-' if acc is None else f'{100 * acc:.1f}'} | "
                         + " | ".join(_pm(row["nfr_by_category"][g]) for row in summ["methods"].values()) + " |")
    refusal = results["pi0_refusal_rate_by_category"]
    lines += ["", "Refusal rate per category (% of the category's responses that refuse, mean ± std):", "",
              "| category | pi0 | " + " | ".join(NAMES[m] for m in summ["methods"]) + " |",
              "|---|---|" + "---|" * len(summ["methods"])]
    for g in sorted(refusal):
        lines.append(f"| {g} | {100 * refusal[g]:.1f} | "
                     + " | ".join(_pm(row["refusal_rate_by_category"].get(g)) for row in summ["methods"].values())
                     + " |")
    if results["gamma_sweep"]:
        lines += ["", "Gamma sweep (DPO+FlipGuard, seed 1):", "", "| gamma | accuracy | NFR | win rate | mean gate_rate |",
                  "|---|---|---|---|---|"]
        for row in results["gamma_sweep"]:
            gate = "-" if row["mean_gate_rate"] is None else f"{row['mean_gate_rate']:.3f}"
            lines.append(f"| {row['gamma']:g} | {100 * row['accuracy']:.1f} | {100 * row['nfr']:.1f} | "
                         f"{100 * row['win_rate']:.1f} | {gate} |")
    lines += ["", "![gate_rate](gate_rate.png)", ""]
    for method in results.get("scatter_files", []):
        lines.append(f"![{NAMES[method]}: R(pi0) vs R(pi)](scatter_{method}.png)")
    lines += ["", f"Reproduce: `{results['command']}` ({results['total_seconds'] / 60:.1f} minutes on this "
              "machine). Commands run:", "", "```", *[c["command"] for c in results["commands"]], "```", ""]
    return "\n".join(lines)


def write_report(results: dict, log: Callable[[str], None] = print) -> Path:
    """``OUT/report.json``, ``OUT/report.md``, ``OUT/gate_rate.png`` and, with a reward model,
    ``OUT/scatter_<method>.png`` (fig. 7: R(pi0) against R(pi), seed 1)."""
    out = ROOT / results["settings"]["out"]
    out.mkdir(parents=True, exist_ok=True)
    scatter = results.pop("_scatter", {})
    curves = {"gate_rate": {NAMES[m]: [tuple(p) for p in runs[0]["gate_rate_curve"]]
                            for m, runs in results["runs"].items() if runs[0]["gate_rate_curve"]}}
    drawn = training_curves(curves, out / "gate_rate.png", titles={"gate_rate": "gate_rate (seed 1)"},
                            suptitle="fraction of samples the constraint's CE term acts on")
    results["scatter_files"] = [m for m, rep in scatter.items()
                                if flip_scatter(rep, out / f"scatter_{m}.png", title=f"{NAMES[m]} (RM)")]
    if not drawn:
        log(MISSING)
    write_json(results, out / "report.json")
    tmp = out / "report.md.tmp"
    tmp.write_text(markdown_report(results), encoding="utf-8")
    tmp.replace(out / "report.md")
    return out / "report.md"
