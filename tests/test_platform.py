"""The CPU adaptation of megatron-core (fg_megatron/platform.py), one check per adaptation."""

import subprocess
import sys

import pytest
import torch

from fg_megatron import platform

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU adaptation is off with CUDA")


@pytest.fixture(scope="module", autouse=True)
def adapted():
    assert platform.adapt_megatron_for_cpu() is True
    assert platform.adapt_megatron_for_cpu() is True  # idempotent


def test_pinned_megatron_core_version():
    from megatron.core import package_info

    assert package_info.__version__ == platform.MEGATRON_CORE_VERSION == "0.16.1"


def test_device_queries_and_literal_cuda_buffers_land_on_cpu():
    from megatron.core.transformer import utils

    causal = utils.get_default_causal_mask(4)  # torch.ones(..., device="cuda") upstream
    assert causal.device.type == "cpu"
    assert causal.tolist()[0] == [False, True, True, True]
    window = utils.get_sliding_window_causal_mask(5, 5, (1, 0))
    # True = masked: position 3 sees only 2 and 3
    assert window[3].tolist() == [True, True, False, False, True]
    assert utils.torch.cuda.current_device() == "cpu"
    utils.torch.cuda.synchronize()  # a no-op instead of a CUDA error


def test_real_torch_is_untouched():
    assert torch.cuda.is_available() is False
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1).cuda()


def test_rng_tracker_forks_the_cpu_generator():
    from megatron.core import tensor_parallel

    platform.seed_everything(5, tp_rank=1)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    assert isinstance(tracker, platform.CpuRNGStatesTracker)
    outer_before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outer_before)  # the default stream is restored
    with tracker.fork():
        b = torch.rand(3)
    assert not torch.equal(a, b)  # the forked stream advanced
    platform.seed_everything(5, tp_rank=1)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(3), a)  # reproducible from the seed
    platform.seed_everything(5, tp_rank=0)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        assert not torch.equal(torch.rand(3), a)  # TP ranks get different streams, as megatron-core


def test_tied_embedding_cuda_copy_is_wrapped_and_scoped():
    from megatron.core.models.common.language_module.language_module import LanguageModule

    assert getattr(LanguageModule.setup_embeddings_and_output_layer, "__fg_cpu_adapted__", False)
    with platform._tensor_cuda_is_identity():
        t = torch.ones(2)
        assert t.cuda() is t
    with pytest.raises((AssertionError, RuntimeError)):
        torch.ones(1).cuda()


def test_fp16_optimizer_accepts_cpu_params_and_the_type_names_are_scoped():
    """Float16OptimizerWithFloat16Params sorts params by CUDA type names; on CPU they are
    renamed for its constructor only (tests/test_hardening.py trains through it)."""
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    assert getattr(Float16OptimizerWithFloat16Params.__init__, "__fg_cpu_adapted__", False)
    with platform._tensor_type_names_cuda():
        assert torch.ones(1, dtype=torch.float16).type() == "torch.cuda.HalfTensor"
        assert torch.ones(1).type() == "torch.cuda.FloatTensor"
        assert torch.ones(1).type(torch.float64).dtype == torch.float64  # conversions untouched
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.BFloat16Tensor"


def test_transformers_still_imports_with_repo_root_on_path(tmp_path):
    """kernels/ must not shadow the PyPI `kernels` package transformers probes."""
    from dist_utils import ROOT

    code = ("import sys; sys.path.insert(0, %r); import transformers; "
            "from transformers.utils.import_utils import is_kernels_available; "
            "from transformers import LlamaForCausalLM; print(is_kernels_available())") % str(ROOT)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"


def test_transformer_engine_names_map_to_checkpoint_names():
    """TE fuses the pre-attention / pre-MLP norms into the next linear layer; checkpoints
    keep the local spec's names, so either spec loads the same files."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec  # noqa: F401

    from fg_megatron.models.gpt import local_param_name
    from fg_megatron.models.sharding import shard_kind

    assert local_param_name("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight") == \
        "decoder.layers.3.input_layernorm.weight"
    assert local_param_name("decoder.layers.0.mlp.linear_fc1.layer_norm_weight") == \
        "decoder.layers.0.pre_mlp_layernorm.weight"
    for name in ("decoder.layers.0.self_attention.linear_qkv.weight", "decoder.final_layernorm.weight",
                 "embedding.word_embeddings.weight"):
        assert local_param_name(name) == name
    assert shard_kind(local_param_name("decoder.layers.1.mlp.linear_fc1.layer_norm_weight")) == "rep"
