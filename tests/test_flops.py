"""The model-FLOP formula (fg_megatron/models/flops.py) against hand-computed values and against
``torch.utils.flop_counter.FlopCounterMode`` counting transformers' ``LlamaForCausalLM``; the
peak table and the tflops / mfu arithmetic."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fg_megatron.models.arch import ModelArch
from fg_megatron.models.flops import forward_flops, generation_flops, matmul_params, training_flops
from fg_megatron.trainers.throughput import device_peak_tflops, throughput_metrics

# h=64, 4 heads of 16, 2 KV groups, ffn 96, 2 layers, vocab 1000 (tests/tiny_models.py llama_gqa_untied)
ARCH = ModelArch(family="llama", vocab_size=1000, hidden_size=64, ffn_hidden_size=96, num_layers=2,
                 num_attention_heads=4, num_query_groups=2, head_dim=16, norm_eps=1e-5, max_position_embeddings=256)


def test_hand_computed_values():
    # per layer: Q 64*64 + K,V 2*64*32 + out 64*64 = 12288; SwiGLU 3*64*96 = 18432; head 64*1000
    assert matmul_params(ARCH) == 2 * (12288 + 18432) + 64000 == 125440
    # s=10: 2*125440*10 + 2 layers * 4 * 10*10 * 64 = 2508800 + 51200
    assert forward_flops(ARCH, 10) == 2560000
    assert training_flops(ARCH, [10, 3]) == 3 * (2560000 + 2 * 125440 * 3 + 2 * 4 * 9 * 64)
    value = ModelArch(**{**ARCH.to_dict(), "head": "value"})
    assert matmul_params(value) == 125440 - 64000 + 64  # hidden -> 1
    # KV cache: prompt 5 -> forward(5); new tokens 1, 2 fed at 6 and 7 cached keys
    assert generation_flops(ARCH, 5, 3) == forward_flops(ARCH, 5) + 2 * (2 * 125440) + 2 * 4 * (6 + 7) * 64
    assert generation_flops(ARCH, 5, 0) == 0


def _hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      attn_implementation="eager")  # eager: Q K^T and A V are counted as the bmm's they are
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float()


def test_forward_and_backward_match_flop_counter_on_transformers_llama():
    """Exact: FlopCounterMode counts the matmuls (linear layers, lm_head over the real vocabulary,
    the two attention bmm's over the full s x s matrix: the causal mask is applied to the scores,
    it does not shrink the product) and nothing element-wise, as the formula does."""
    model = _hf_llama()
    ids = torch.randint(0, 1000, (3, 17), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as fwd:
        out = model(input_ids=ids).logits
    assert fwd.get_total_flops() == 3 * forward_flops(ARCH, 17)
    with FlopCounterMode(display=False) as bwd:
        out.float().sum().backward()
    assert bwd.get_total_flops() == 2 * fwd.get_total_flops()  # backward = 2 x forward
    assert fwd.get_total_flops() + bwd.get_total_flops() == training_flops(ARCH, [17, 17, 17])


def test_generation_matches_flop_counter_on_transformers_generate():
    """transformers' generate with its KV cache: the prompt's forward, then one token at a time
    over the cached keys.  One term differs: its prefill computes lm_head logits for the last
    prompt position only (logits_to_keep=1), the formula counts all p positions' head."""
    model = _hf_llama().eval()
    p, n = 7, 5
    ids = torch.randint(3, 1000, (1, p), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.shape[1] == p + n
    assert counter.get_total_flops() == generation_flops(ARCH, p, n) - 2 * 64 * 1000 * (p - 1)


def test_peak_table_and_mfu_arithmetic():
    assert device_peak_tflops(torch.bfloat16, "NVIDIA H100 80GB HBM3") == 989.0
    assert device_peak_tflops(torch.bfloat16, "NVIDIA H100 PCIe") == 756.0
    assert device_peak_tflops(torch.float16, "NVIDIA A100-SXM4-80GB") == 312.0
    assert device_peak_tflops(torch.bfloat16, "NVIDIA H200") == 989.0
    assert device_peak_tflops(torch.float32, "NVIDIA H200") in (66.9, 494.7)  # plain fp32 or TF32
    assert device_peak_tflops(torch.bfloat16, "NVIDIA H100 NVL") is None
    assert device_peak_tflops(torch.bfloat16, "Some Other GPU") is None
    m = throughput_metrics(6e12, 2.0, 4, 0.5)
    assert m["tflops"] == pytest.approx(6e12 / 2.0 / 4 / 1e12) and m["mfu"] == pytest.approx(0.75 / 0.5)
    assert throughput_metrics(6e12, 2.0, 4, None).keys() == {"tflops"}
    assert throughput_metrics(None, 2.0, 4, 0.5) == {}
