"""Layout validation: one-line errors before any work."""

import re
import subprocess
import sys

import pytest

from dist_utils import ROOT, torchrun
from fg_megatron.models import arch_from_hf_config, sharding
from fg_megatron.parallel import ParallelLayoutError, stage_layer_counts, validate_layout
from tiny_models import hf_config


def test_valid_layouts_give_dp():
    assert validate_layout(8, 2, 2, num_kv_heads=4, num_layers=4) == 2
    assert validate_layout(2, 1, 1) == 2
    assert validate_layout(2, 1, 2, num_layers=3) == 1  # uneven stages
    assert validate_layout(4, 1, 2, num_layers=3, layers_per_stage=[1, 2]) == 2


@pytest.mark.parametrize("world,tp,pp,kw,needle", [
    (3, 2, 1, {}, "world size 3 is not divisible by tp*pp = 2*1 = 2"),
    (4, 4, 1, {"num_kv_heads": 2}, "tensor parallel size 4 does not divide the model's 2 key/value heads"),
    (4, 1, 4, {"num_layers": 3}, "pipeline parallel size 4 is larger than the model's 3 layers"),
    (2, 1, 2, {"num_layers": 3, "layers_per_stage": [2, 2]},
     "layers_per_stage [2, 2] (parallel.layers_per_stage / --layers-per-stage) sums to 4, but the model has 3 layers"),
    (2, 1, 2, {"layers_per_stage": [3]}, "layers_per_stage [3] (parallel.layers_per_stage / --layers-per-stage) "
                                         "has 1 entries, the pipeline parallel size is 2"),
    (2, 1, 2, {"num_layers": 3, "layers_per_stage": [3, 0]}, "every stage needs at least one layer"),
    (2, 0, 1, {}, "must be >= 1"),
])
def test_invalid_layouts(world, tp, pp, kw, needle):
    with pytest.raises(ParallelLayoutError, match=re.escape(needle)) as exc:
        validate_layout(world, tp, pp, **kw)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("num_layers,pp,counts", [
    (4, 2, [2, 2]), (3, 2, [2, 1]), (5, 3, [2, 2, 1]), (30, 4, [8, 8, 7, 7]), (28, 8, [4, 4, 4, 4, 3, 3, 3, 3]),
    (7, 7, [1] * 7), (3, 1, [3]),
])
def test_default_split_rule(num_layers, pp, counts):
    """Even when pp divides the layers; else the first layers % pp stages hold one more."""
    assert stage_layer_counts(num_layers, pp) == counts
    assert stage_layer_counts(num_layers, pp, counts) == counts  # an explicit list is kept as given
    assert stage_layer_counts(num_layers, pp, [num_layers - pp + 1] + [1] * (pp - 1))[0] == num_layers - pp + 1


@pytest.mark.parametrize("counts", [[2, 1], [1, 2], [2, 2, 1], [1, 3, 1], [1, 2, 1, 2], [3, 1, 1, 1]])
def test_megatron_core_numbers_stages_as_the_checkpoint_mapping(counts):
    """The layout handed to megatron-core builds, on each stage, the layers the checkpoint
    mapping puts there (the distributed parity tests also check the built modules)."""
    from megatron.core.transformer.enums import LayerType

    from fg_megatron.models.gpt import transformer_config

    pp, num_layers = len(counts), sum(counts)
    arch = arch_from_hf_config(hf_config("llama_gqa_untied", num_layers).to_dict())
    layout = transformer_config(arch, tp=1, pp=pp, layers_per_stage=counts).pipeline_model_parallel_layout
    for stage in range(pp):
        built = layout.get_layer_id_list(LayerType.decoder, pp_rank=stage)
        assert built == list(sharding.layers_of_stage(num_layers, pp, stage, counts)), (counts, stage)
        for local, layer in enumerate(built):  # stage-local checkpoint names <-> model-wide names
            full = f"decoder.layers.{layer}.mlp.linear_fc1.weight"
            here = f"decoder.layers.{local}.mlp.linear_fc1.weight"
            assert sharding.stage_of(full, arch, pp, counts) == [(stage, here)]
            assert sharding.full_name(here, arch, pp, stage, counts) == full
    # an even split keeps megatron-core's own num_layers // pp
    even = arch_from_hf_config(hf_config("llama_gqa_untied", 2 * pp).to_dict())
    assert transformer_config(even, tp=1, pp=pp).pipeline_model_parallel_layout is None


@pytest.mark.distributed
def test_cli_refuses_tp_larger_than_kv_heads(tmp_path):
    # the tiny pi0 has 2 KV heads; 4 processes at TP=4
    proc = torchrun(ROOT / "tools/train_dpo.py", 4, "--tp", "4", "--save", tmp_path / "s", check=False)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert errors, proc.stderr[-3000:]
    assert "tensor parallel size 4 does not divide the model's 2 key/value heads" in errors[0]
    assert len(errors) == 1  # rank 0 speaks for everyone
    assert not (tmp_path / "s/checkpoints").exists()


def test_score_refuses_world_not_divisible(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools/score.py"), "--load", str(ROOT / "assets/tiny/pi0"),
                           "--data", "x.jsonl", "--out", str(tmp_path / "o"), "--tp", "2"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: world size 1 is not divisible by tp*pp = 2*1 = 2; launch a multiple of 2 processes or change --tp/--pp")
