"""A training step through megatron-core (AdamW, clipping, weight decay) gives the
same losses, grad norms and updated weights at TP=2, PP=2 (even and uneven stages)
and DP=2 as at TP=1:
gradients flow correctly through the vocab-parallel log-probs, the tied
embedding copy and the DP all-reduce."""

import glob

import pytest
from safetensors.torch import load_file

from dist_utils import torchrun_json

LAYOUTS = {"tp1": (1, 1, 1), "tp2": (2, 1, 2), "pp2": (1, 2, 2), "dp2": (1, 1, 2)}


def _run(tmp_path, variant, layout, *extra):
    tp, pp, nproc = LAYOUTS[layout]
    wdir = tmp_path / f"{variant}_{layout}"
    res = torchrun_json("train_steps.py", nproc, "--tp", str(tp), "--pp", str(pp), "--variant", variant,
                        "--weights", str(wdir), *extra, out=tmp_path / f"{variant}_{layout}.json")
    weights = {}
    for f in sorted(glob.glob(str(wdir / "stage*.safetensors"))):
        weights.update(load_file(f))
    return res, weights


@pytest.mark.distributed
@pytest.mark.parametrize("variant,layouts", [
    ("llama_mha_tied", ["tp2", "pp2", "dp2"]),
    ("llama_gqa_untied", ["tp2"]),
])
def test_parallel_training_matches_single_process(tmp_path, variant, layouts):
    _compare_layouts(tmp_path, variant, layouts)


@pytest.mark.distributed
def test_uneven_pipeline_training_matches_single_process(tmp_path):
    """3 layers at PP=2 (stages of 2 and 1 layers), a tied embedding: same steps as one process."""
    _compare_layouts(tmp_path, "llama_mha_tied", ["pp2"], "--num-layers", "3")


def _compare_layouts(tmp_path, variant, layouts, *extra):
    ref, ref_w = _run(tmp_path, variant, "tp1", *extra)
    assert ref["losses"][0] > ref["losses"][-1] - 1.0  # sane, finite losses
    for layout in layouts:
        res, w = _run(tmp_path, variant, layout, *extra)
        for a, b in zip(ref["losses"], res["losses"]):
            assert abs(a - b) <= 1e-5 * abs(a), (layout, ref["losses"], res["losses"])
        for a, b in zip(ref["grad_norms"], res["grad_norms"]):
            assert abs(a - b) <= 1e-5 * abs(a), (layout, ref["grad_norms"], res["grad_norms"])
        tied_copy = w.pop("tied_output_copy", None)
        assert set(w) == set(ref_w), layout
        for name in ref_w:
            diff = (w[name] - ref_w[name]).abs().max().item()
            assert diff <= 2e-5, (layout, name, diff)
        if tied_copy is not None:  # the last stage's copy of a tied embedding stays in sync
            assert (tied_copy - w["embedding.word_embeddings.weight"]).abs().max() <= 1e-6
