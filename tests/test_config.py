"""Typed configs: every shipped YAML loads; unknown keys, bad types and inconsistent
values are one-line errors naming the key; CLI flags map to dotted names."""

from pathlib import Path

import pytest

from fg_megatron.config import ConfigError, DPORunConfig, PPORunConfig, RMRunConfig, SFTRunConfig, load_config
from fg_megatron.config.cli import PREFERENCE_FLAGS, parse_run_config, resolve_path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_points_at_real_files(path):
    kinds = {"dpo": DPORunConfig, "rm": RMRunConfig, "ppo": PPORunConfig}
    cls = kinds.get(path.name.split("_")[0], SFTRunConfig)
    cfg = load_config(cls, path)
    assert Path(resolve_path(cfg.data.train)).is_file(), cfg.data.train
    if cfg.model.load != "assets/tiny/init":  # built by tools/make_tiny_pi0.py
        assert (Path(resolve_path(cfg.model.load)) / "config.json").is_file(), cfg.model.load


def test_defaults_are_the_papers():
    cfg = DPORunConfig()
    assert (cfg.dpo.beta, cfg.dpo.gamma, cfg.dpo.epsilon) == (0.1, 0.01, 0.0)
    assert (cfg.dpo.constraint, cfg.dpo.ce_reduction, cfg.dpo.reference) == ("flipguard", "sum", "precompute")


@pytest.mark.parametrize("override,needle", [
    ("dpo.gama=1", "dpo: unknown key 'gama'"),
    ("nope.x=1", "unknown key 'nope'"),
    ("train.steps=abc", "train.steps: expected an integer, got 'abc'"),
    ("train.steps=1.5", "train.steps: expected an integer"),
    ("dpo.constraint=soft", "dpo.constraint: 'soft' is not one of ['none', 'kd', 'flipguard']"),
    ("train.resume=maybe", "train.resume: expected true/false"),
    ("train.steps=0", "train.steps must be >= 1"),
    ("train.global_batch_size=7", "must be a positive multiple of train.micro_batch_size"),
    ("dpo.beta=0", "dpo.beta must be > 0"),
    ("dpo.gamma=-1", "dpo.gamma must be >= 0"),
    ("data.max_prompt_length=0", "data.max_prompt_length and data.max_response_length must be >= 1"),
    ("data.max_length=1", "data.max_length must be >= 2 (one prompt and one response token) or null"),
    ("data.truncation_mode=left", "data.truncation_mode: 'left' is not one of ['keep_end', 'keep_start']"),
    ("data.on_truncation=skip", "data.on_truncation: 'skip' is not one of ['warn', 'drop', 'error']"),
    ("model.vocab_pad_multiple=0", "model.vocab_pad_multiple must be >= 1"),
    ("optim.min_lr=1", "0 <= min_lr <= lr"),
    # NaN compares false with every bound, so range checks alone would let these through
    ("dpo.gamma=nan", "dpo.gamma: must be a finite number, got 'nan'"),
    ("dpo.gamma=.nan", "dpo.gamma: must be a finite number"),
    ("optim.lr=inf", "optim.lr: must be a finite number, got 'inf'"),
    ("optim.lr=nan", "optim.lr: must be a finite number"),
    ("dpo.epsilon=-inf", "dpo.epsilon: must be a finite number"),
    ("ppo.kl_coef=nan", "unknown key 'ppo'"),  # a DPO config has no ppo section
    ("optim.lr=0", "optim.lr must be > 0 (got 0.0): a zero learning rate trains nothing"),
    ("optim.adam_beta2=1", "optim.adam_beta1 and optim.adam_beta2 must be in [0, 1)"),
    ("optim.adam_eps=0", "optim.adam_eps > 0"),
    ("optim.initial_loss_scale=0", "optim.initial_loss_scale and optim.loss_scale_window must be >= 1"),
    ("parallel.layers_per_stage=[2,1]", "layers_per_stage [2, 1] (parallel.layers_per_stage / --layers-per-stage) "
                                        "has 2 entries, the pipeline parallel size is 1"),
    ("parallel.layers_per_stage=[x]", "parallel.layers_per_stage[0]: expected an integer, got 'x'"),
])
def test_bad_values_are_one_line_errors(override, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(DPORunConfig, ROOT / "configs/dpo_tiny.yaml", [override])
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg
    assert msg.startswith(f"{ROOT / 'configs/dpo_tiny.yaml'} with overrides ")


@pytest.mark.parametrize("override,needle", [
    ("ppo.kl_coef=nan", "ppo.kl_coef: must be a finite number"),
    ("ppo.missing_eos_penalty=inf", "ppo.missing_eos_penalty: must be a finite number"),
    ("ppo.score_clip=0", "ppo.score_clip must be > 0 or null"),
    ("ppo.missing_eos_penalty=-1", "ppo.missing_eos_penalty must be >= 0 or null"),
    ("ppo.critic_lr=nan", "ppo.critic_lr: must be a finite number"),
])
def test_bad_ppo_values_are_one_line_errors(override, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(PPORunConfig, ROOT / "configs/ppo_tiny.yaml", [override])
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_every_float_field_refuses_nan_and_inf():
    """Walk every float field of every run config: none accepts a non-finite value."""
    import dataclasses
    import typing

    from fg_megatron.config.loader import _unwrap_optional

    def float_fields(cls, prefix=""):
        for f in dataclasses.fields(cls):
            tp, _ = _unwrap_optional(typing.get_type_hints(cls)[f.name])
            if dataclasses.is_dataclass(tp):
                yield from float_fields(tp, f"{prefix}{f.name}.")
            elif tp is float:
                yield f"{prefix}{f.name}"

    checked = 0
    for cls in (DPORunConfig, PPORunConfig, RMRunConfig, SFTRunConfig):
        for key in float_fields(cls):
            for bad in ("nan", "inf", "-inf"):
                with pytest.raises(ConfigError, match=f"{key}: must be a finite number"):
                    load_config(cls, overrides=[f"{key}={bad}"])
            checked += 1
    assert checked > 40


def test_label_smoothing_only_with_sigmoid():
    load_config(DPORunConfig, overrides=["dpo.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="sigmoid only"):
        load_config(DPORunConfig, overrides=["dpo.label_smoothing=0.1", "dpo.loss_type=ipo"])


def test_cross_field_checks_see_final_values_whatever_the_order():
    # micro 32 first would not divide the file's global batch of 16; the final values do.
    cfg = load_config(DPORunConfig, ROOT / "configs/dpo_tiny.yaml",
                      ["train.micro_batch_size=32", "train.global_batch_size=64"])
    assert (cfg.train.micro_batch_size, cfg.train.global_batch_size) == (32, 64)


def test_yaml_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 3\n  seed: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+ invalid YAML"):
        load_config(DPORunConfig, bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("dpo:\n  gamma: 0.1\n  epsilonn: 0\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml: dpo: unknown key 'epsilonn'"):
        load_config(DPORunConfig, unknown)


def test_cli_flags_map_to_dotted_names_in_order():
    cfg = parse_run_config(DPORunConfig, ["--tp", "2", "--gamma", "0.05", "--constraint", "kd", "--resume",
                                          "--set", "dpo.gamma=0.02", "--steps", "7"],
                           description="x", extra_flags=PREFERENCE_FLAGS, default_config="configs/dpo_tiny.yaml")
    assert cfg.parallel.tp == 2 and cfg.dpo.constraint == "kd" and cfg.train.resume is True
    assert cfg.dpo.gamma == 0.02  # the later --set wins
    assert cfg.train.steps == 7 and cfg.train.global_batch_size == 16  # the rest from the YAML


def test_layers_per_stage_from_yaml_set_and_flag(tmp_path):
    """parallel.layers_per_stage: null by default; a list from YAML, --set or --layers-per-stage 2,1;
    one entry per stage, each >= 1 (its sum is checked against the model when it loads)."""
    assert DPORunConfig().parallel.layers_per_stage is None
    cfg = load_config(DPORunConfig, overrides=["parallel.pp=3", "parallel.layers_per_stage=[2, 2, 1]"])
    assert cfg.parallel.layers_per_stage == [2, 2, 1]
    yaml_file = tmp_path / "split.yaml"
    yaml_file.write_text("parallel:\n  pp: 2\n  layers_per_stage: [1, 2]\n")
    assert load_config(DPORunConfig, yaml_file).parallel.layers_per_stage == [1, 2]
    cfg = parse_run_config(DPORunConfig, ["--pp", "2", "--layers-per-stage", "2,1"], description="x",
                           default_config="configs/dpo_tiny.yaml")
    assert (cfg.parallel.pp, cfg.parallel.layers_per_stage) == (2, [2, 1])
    with pytest.raises(ConfigError, match="every stage needs at least one layer") as exc:
        load_config(DPORunConfig, overrides=["parallel.pp=2", "parallel.layers_per_stage=[3, 0]"])
    assert "\n" not in str(exc.value)
    with pytest.raises(SystemExit):  # argparse: "expected comma-separated layer counts such as 2,1"
        parse_run_config(DPORunConfig, ["--layers-per-stage", "2;1"], description="x")


# -- which defaults apply, --help, the run summary (issue 12) ---------------------------------------

TINY = "configs/dpo_tiny.yaml"


@pytest.mark.parametrize("config,overrides,expected", [
    (None, [], (TINY, f"bundled tiny default ({TINY})")),
    (None, [("train.steps", 3), "dpo.gamma=0.1"], (TINY, f"bundled tiny default ({TINY})")),
    (None, [("model.load", "my/model")], (None, "defaults for your model")),
    (None, [("data.train", "hh.jsonl")], (None, "defaults for your model")),
    (None, ["data.train=hh.jsonl"], (None, "defaults for your model")),
    ("mine.yaml", [("model.load", "my/model")], ("mine.yaml", "mine.yaml")),
])
def test_choose_config_rule(config, overrides, expected):
    from fg_megatron.config.cli import choose_config

    assert choose_config(config, overrides, TINY) == expected


def test_own_model_or_data_gets_real_model_defaults_not_the_tiny_config():
    def parse(*argv):
        return parse_run_config(DPORunConfig, list(argv), description="x", extra_flags=PREFERENCE_FLAGS,
                                default_config=TINY, announce=False)

    tiny = load_config(DPORunConfig, ROOT / TINY)
    assert parse("--steps", "3").optim.lr == tiny.optim.lr == 5e-4  # bundled runs are unchanged
    for argv in (["--load", "my/model"], ["--data", "hh.jsonl"], ["--set", "model.load=my/model"]):
        cfg = parse(*argv)
        assert (cfg.optim.lr, cfg.optim.lr_schedule, cfg.optim.warmup_steps, cfg.optim.weight_decay) == \
            (1e-6, "cosine", 10, 0.1), argv
        assert (cfg.data.max_prompt_length, cfg.data.max_response_length, cfg.train.steps) == (192, 64, 100)
        assert (cfg.train.global_batch_size, cfg.dpo.gamma) == (64, 0.01)
    assert parse("--config", TINY, "--load", "my/model").optim.lr == 5e-4  # --config always wins
    assert SFTRunConfig().optim.lr == 5e-6 and DPORunConfig().optim.lr == 1e-6


def test_help_shows_effective_defaults_and_metavars(capsys):
    def help_text(*argv):
        with pytest.raises(SystemExit):
            parse_run_config(DPORunConfig, [*argv, "--help"], description="x\n\n    line one\n    line two\n",
                             extra_flags=PREFERENCE_FLAGS, default_config=TINY, announce=False)
        return capsys.readouterr().out

    tiny = help_text()
    assert "--lr LR" in tiny and "--tp N" in tiny and "--load PATH" in tiny and "--save DIR" in tiny
    assert "_PARALLEL" not in tiny and "(default: None)" not in tiny
    assert "(default: 0.0005)" in tiny and "(default: 120)" in tiny  # the tiny YAML's lr and steps
    assert "    line one\n    line two" in tiny  # usage examples keep their lines
    assert "--bf16" in tiny and "--fp16" in tiny
    own = help_text("--load", "my/model")
    assert "(default: 1e-06)" in own and "(default: 100)" in own and "Defaults shown: defaults for your model" in own


def test_bf16_and_fp16_flags():
    def parse(*argv):
        return parse_run_config(DPORunConfig, list(argv), description="x", default_config=TINY, announce=False)

    assert parse("--bf16").model.dtype == "bfloat16"
    assert parse("--fp16").model.dtype == "float16"
    assert parse("--bf16", "--set", "model.dtype=float32").model.dtype == "float32"  # command-line order
    assert parse().model.dtype == "auto"


def test_run_summary_names_source_and_key_values(monkeypatch):
    from fg_megatron.config.cli import describe_run

    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = load_config(DPORunConfig, ROOT / TINY, ["parallel.tp=2"])
    text = describe_run(cfg, "bundled tiny default (configs/dpo_tiny.yaml)")
    assert text.splitlines()[0] == "config: bundled tiny default (configs/dpo_tiny.yaml)"
    for needle in ("assets/tiny/pi0", "tp=2 pp=1 dp=2", "pref_train.jsonl (format auto)", "prompt <= 64",
                   "response <= 24", "global 16, micro 8", "lr 0.0005 cosine, warmup 5", "steps 120"):
        assert needle in text, needle
    assert len(text.splitlines()) == 4


def test_report_to_wandb_needs_the_package(monkeypatch, tmp_path):
    import importlib.util

    with pytest.raises(ConfigError, match="'mlflow' is not one of"):
        load_config(DPORunConfig, overrides=["train.report_to=[mlflow]"])
    assert load_config(DPORunConfig, overrides=["train.report_to=[]"]).train.report_to == []
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError) as exc:
        load_config(DPORunConfig, overrides=["train.report_to=[tensorboard, wandb]"])
    assert "pip install wandb" in str(exc.value) and "\n" not in str(exc.value)


def test_metrics_go_to_wandb_when_asked(monkeypatch, tmp_path):
    import sys
    import types

    from fg_megatron.trainers.metrics import MetricsWriter

    calls = []
    run = types.SimpleNamespace(log=lambda d, step: calls.append(("log", step, d)),
                                finish=lambda: calls.append(("finish",)))
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    w = MetricsWriter(tmp_path, enabled=True, tensorboard=True, total_steps=1, report_to=["wandb"],
                      run_config={"optim": {"lr": 1e-6}})
    w.write(1, {"loss": 0.5, "gated_ids": [1]})
    w.close()
    assert calls[0][0] == "init" and calls[0][1]["config"] == {"optim": {"lr": 1e-6}}
    assert calls[1] == ("log", 1, {"train/loss": 0.5}) and calls[2] == ("finish",)
    assert w.tb is None and not (tmp_path / "tb").exists()  # tensorboard not in report_to


def test_every_tool_help_has_metavars_help_text_and_readable_examples():
    """Each tool's --help: usage examples on their own lines, a help text and a proper metavar
    (N, PATH, FILE, DIR, ...) for every flag, no 'default: None'."""
    import os
    import re
    import subprocess
    import sys

    tools = ["train_dpo", "score", "generate", "eval_flips", "run_flip_experiment"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = {t: subprocess.Popen([sys.executable, str(ROOT / f"tools/{t}.py"), "--help"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env) for t in tools}
    for tool, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (tool, err[-2000:])
        assert "default: None" not in out and not re.search(r"--\S+ _?[A-Z_]+\.[A-Z_]+", out), (tool, out)
        assert re.search(r"\n    (torchrun|python) ", out), (tool, "usage examples run together")
        options = out.split("options:", 1)[1].split("\n\n")[0]
        entries = re.split(r"\n  (?=-)", "\n" + options.strip("\n"))
        for entry in entries[1:]:
            flag, _, rest = entry.partition("  ")
            assert rest.strip(), (tool, f"{flag.strip()} has no help text")
        for flag in re.findall(r"^  --[a-z0-9-]+ ([^\s{]+)", options, re.M):
            assert flag.isupper() or flag.startswith("N,") or flag == "G,G,...", (tool, flag)
def test_epochs_or_steps_the_last_layer_that_sets_one_wins(tmp_path):
    tiny = ROOT / "configs/dpo_tiny.yaml"  # sets train.steps: 120
    cfg = load_config(DPORunConfig, tiny, ["train.epochs=2"])
    assert (cfg.train.steps, cfg.train.epochs) == (None, 2)
    with_epochs = tmp_path / "e.yaml"
    with_epochs.write_text("train:\n  epochs: 3\n")
    assert (load_config(DPORunConfig, with_epochs).train.epochs, load_config(DPORunConfig, with_epochs).train.steps) \
        == (3, None)
    assert load_config(DPORunConfig, with_epochs, [("train.steps", 5)]).train.epochs is None
    with pytest.raises(ConfigError, match="train.steps=7 and train.epochs=2 are both set"):
        parse_run_config(DPORunConfig, ["--set", "train.epochs=2", "--steps", "7"], description="",
                         extra_flags=PREFERENCE_FLAGS, default_config=str(tiny))
    with pytest.raises(ConfigError, match="train.epochs must be >= 1"):
        load_config(DPORunConfig, tiny, ["train.epochs=0"])
