"""Training in reduced precision on a GPU, and Transformer Engine's layer spec against the
local one (``@gpu``: skipped without CUDA; ``tools/gpu_check.sh`` runs them on the GPU machine).

The CPU counterparts are tests/test_hardening.py's bf16 run and fp16 step; these repeat the
comparison on CUDA, where the Triton log-likelihood kernels and cuBLAS's reduced-precision
GEMMs are what runs.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from dist_utils import ROOT, read_metrics

TRAIN = ROOT / "tools/train_dpo.py"
# The tiny default's model and data, 2 steps of 8 pairs: fast, and step 2 sees one update.
# initial_loss_scale 1024 (fp16 only): 2^16 may overflow in the first step of a tiny model,
# which is then skipped by design, leaving no step-1 gradient to compare.
BASE = ["--steps", "2", "--global-batch-size", "8", "--micro-batch-size", "4", "--set", "train.log_every=100",
        "--set", "optim.warmup_steps=0", "--set", "train.tensorboard=false",
        "--set", "optim.initial_loss_scale=1024"]


@pytest.fixture(scope="module")
def dtype_runs(tmp_path_factory):
    """metrics.jsonl of the same 2-step DPO run in float32, bfloat16 and float16 on CUDA."""
    root = tmp_path_factory.mktemp("gpu_dtypes")
    runs = {}
    for name, extra in (("fp32", ["--set", "model.dtype=float32"]), ("bf16", ["--bf16"]), ("fp16", ["--fp16"])):
        proc = subprocess.run([sys.executable, str(TRAIN), *BASE, *extra, "--save", str(root / name)],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
        runs[name] = read_metrics(root / name)
    return runs


@pytest.mark.gpu
@pytest.mark.parametrize("name,rel", [("bf16", 0.05), ("fp16", 0.02)])
def test_reduced_precision_dpo_steps_match_fp32_on_gpu(dtype_runs, name, rel):
    """bf16 / fp16 training on CUDA: finite losses and grad norms, and step 1's log-probs and
    grad norm and step 2's loss close to fp32's (bf16 at the CPU test's 5%, fp16 tighter)."""
    fp32, run = dtype_runs["fp32"], dtype_runs[name]
    assert len(run) == 2
    for m in run:
        assert all(math.isfinite(m[k]) for k in ("loss", "logps_chosen", "grad_norm")), m
    assert run[0]["logps_chosen"] == pytest.approx(fp32[0]["logps_chosen"], rel=rel)
    assert run[0]["grad_norm"] == pytest.approx(fp32[0]["grad_norm"], rel=rel)
    assert run[1]["loss"] == pytest.approx(fp32[1]["loss"], rel=rel)


@pytest.mark.gpu
def test_te_layer_spec_logits_match_local_spec(tmp_path):
    """The same checkpoint built with Transformer Engine's spec (fused norm + linear, TE
    attention) and with the local spec gives the same logits up to bf16 rounding."""
    pytest.importorskip("transformer_engine")
    from tiny_models import save_hf_model

    hf = save_hf_model("llama_gqa_untied", tmp_path / "hf")
    out = tmp_path / "te.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tests/dist/te_logits.py"), "--load", str(hf), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["max_abs_diff"] < 0.05 * r["local_std"] + 0.05, r
    assert r["argmax_agreement"] > 0.95, r
