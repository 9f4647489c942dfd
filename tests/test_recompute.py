"""``model.recompute``: selective and full activation recomputation give the same losses and
gradients as none (to 1e-6), in one process through the project's model builder and in a
2-process DPO run (TP=2, gloo) through ``tools/train_dpo.py``; the run's metrics also carry
``flops`` equal to the FLOP formula at the batches' real lengths, ``tflops`` and ``mfu``."""

import json

import pytest
import torch

from dist_utils import ROOT, read_metrics, torchrun, torchrun_json

TRAIN = ROOT / "tools/train_dpo.py"
DPO = ["--tp", "2", "--steps", "2", "--global-batch-size", "8", "--micro-batch-size", "4",
       "--set", "optim.warmup_steps=0", "--set", "train.tensorboard=false"]
PEAK = 0.25  # TFLOP/s: any positive number; mfu must be tflops / it


def test_selective_and_full_match_none_one_process(tmp_path):
    res = torchrun_json("recompute_grads.py", 1, out=tmp_path / "r.json")
    none = res["none"]
    assert none["checkpointed_forwards"] == 0 and none["granularity"] is None
    # selective: megatron-core's default module (core attention) in each of the 2 layers;
    # full: each of the 2 layers (uniform method, 1 layer per checkpoint)
    assert (res["selective"]["granularity"], res["selective"]["modules"]) == ("selective", ["core_attn"])
    assert res["selective"]["checkpointed_forwards"] == 2
    assert (res["full"]["granularity"], res["full"]["checkpointed_forwards"]) == ("full", 2)
    for mode in ("selective", "full"):
        got = res[mode]
        assert abs(got["loss"] - none["loss"]) <= 1e-6 * abs(none["loss"]), mode
        assert set(got["grads"]) == set(none["grads"])
        for name, ref in none["grads"].items():
            ref_t, got_t = torch.tensor(ref), torch.tensor(got["grads"][name])
            assert ref_t.abs().max() > 0, name  # every parameter gets a gradient
            assert (got_t - ref_t).abs().max() <= 1e-6, (mode, name)


def _dpo_expected_flops(steps: int) -> list[int]:
    """The FLOP formula over the micro-batches the run sees (same config, DP=1 at TP=2)."""
    from fg_megatron.checkpoint.tokenizer import load_tokenizer
    from fg_megatron.config import DPORunConfig, load_config
    from fg_megatron.data import MicroBatchStream, PreferenceDataset
    from fg_megatron.models import arch_from_hf_config
    from fg_megatron.models.flops import training_flops

    cfg = load_config(DPORunConfig, ROOT / "configs/dpo_tiny.yaml",
                      [("train.steps", steps), ("train.global_batch_size", 8), ("train.micro_batch_size", 4)])
    pi0 = ROOT / cfg.model.load
    arch = arch_from_hf_config(json.loads((pi0 / "config.json").read_text()))
    d = cfg.data
    ds = PreferenceDataset.from_file(ROOT / d.train, load_tokenizer(str(pi0)), d.max_prompt_length,
                                     d.max_response_length, format=d.format, **d.truncation())
    stream = MicroBatchStream.from_config(ds, d, cfg.train, dp_size=1, dp_rank=0)
    # forward + backward (3 x forward) of chosen and rejected at their own lengths
    return [sum(training_flops(arch, mb["lengths"].tolist()) for mb in stream.next_step()) for _ in range(steps)]


@pytest.mark.distributed
def test_full_recompute_dpo_tp2_matches_and_reports_flops(tmp_path):
    torchrun(TRAIN, 2, *DPO, "--save", tmp_path / "none", "--set", f"train.peak_tflops={PEAK}")
    torchrun(TRAIN, 2, *DPO, "--save", tmp_path / "full", "--tensor-model-parallel-size", "2",
             "--recompute", "full")
    none, full = read_metrics(tmp_path / "none"), read_metrics(tmp_path / "full")
    assert len(none) == len(full) == 2
    for a, b in zip(none, full):
        for key in ("loss", "dpo_loss", "reward_margin", "logps_chosen"):
            assert abs(a[key] - b[key]) <= 1e-6, (key, a[key], b[key])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-6 * a["grad_norm"], (a["grad_norm"], b["grad_norm"])
        assert b["flops"] == a["flops"]  # model FLOPs exclude recomputation
        assert "mfu" not in b  # CPU: no known peak unless train.peak_tflops is set
    assert [m["flops"] for m in none] == _dpo_expected_flops(2)
    for m in none:
        assert m["tflops"] > 0
        assert abs(m["tflops"] - m["flops"] / m["step_seconds"] / 2 / 1e12) <= 1e-9 * m["tflops"]  # world size 2
        assert m["mfu"] == pytest.approx(m["tflops"] / PEAK, rel=1e-12)
