"""The memory planner (fg_megatron/planning, tools/plan_memory.py): exact parameter /
gradient / optimizer bytes against a real TP=2 x PP=2 x DP=2 run, hand-computed
activation and head terms, PPO's four models, and the CLI."""

import importlib.util
import json
import subprocess
import sys
from dataclasses import replace

import pytest

from dist_utils import ROOT, torchrun_json
from fg_megatron.models import arch_from_hf_config
from fg_megatron.planning import PRESETS, PlanInputError, PlanInputs, load_hf_config, plan
from fg_megatron.planning import activations, heads, params
from fg_megatron.planning.hardware import GPUS, fits
from fg_megatron.planning.memory import stage_plans
from tiny_models import hf_config as tiny_hf_config
from tiny_models import save_hf_model

TOOL = ROOT / "tools" / "plan_memory.py"


def _tool():
    spec = importlib.util.spec_from_file_location("plan_memory_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _glm_tiny() -> dict:
    """transformers' GLM config: vocab 1003 (padded to 1024 at TP=2), QKV bias, 2 KV groups, head_dim 16."""
    return tiny_hf_config("glm_mqa_bias").to_dict()


# --- exact bytes against the trainer's own tensors --------------------------------


def test_params_grads_optimizer_bytes_equal_a_real_tp2_pp2_dp2_run(tmp_path):
    """8 processes (tp=2, pp=2 -> dp=2), loaded through trainers.parts.load_part, one Adam step:
    pi0 (tied embeddings: the last stage holds its own copy) in fp32, and a GLM (padded
    vocabulary, QKV bias, untied output layer) in bf16 with its fp32 RMSNorm weights."""
    glm = save_hf_model("glm_mqa_bias", tmp_path / "glm")
    pi0 = ROOT / "assets" / "tiny" / "pi0"
    cases = {f"{pi0}:float32": (pi0, "fp32"), f"{glm}:bfloat16": (glm, "bf16")}
    got = torchrun_json("plan_bytes.py", 8, *[a for c in cases for a in ("--case", c)], "--tp", "2", "--pp", "2",
                        out=tmp_path / "r.json", timeout=900)
    for case, (path, dtype) in cases.items():
        rows = got[case]
        assert sorted((r["pp_rank"], r["tp_rank"], r["dp_rank"]) for r in rows) == \
            [(p, t, d) for p in range(2) for t in range(2) for d in range(2)]
        _, config = load_hf_config(str(path))
        stages = stage_plans(config, PlanInputs(tp=2, pp=2, dp=2, trainer="sft", dtype=dtype, spec="local",
                                                optimizer="replicated"))
        for r in rows:
            assert not r["skipped"] and r["n_states"] > 0  # Adam's m, v exist
            s = stages[r["pp_rank"]]
            assert (r["params_bytes"], r["grads_bytes"], r["optimizer_bytes"]) == \
                (s.params_bytes, s.grads_bytes, s.optimizer_bytes), (case, r)
        last = [r for r in rows if r["pp_rank"] == 1][0]
        assert "output_layer.weight" in last["param_names"]
        if dtype == "bf16":
            assert all(r["n_masters"] > 0 for r in rows)  # fp32 master copies were counted


# --- pure arithmetic ---------------------------------------------------------------


def test_presets_have_the_published_parameter_counts():
    counts = {n: plan(load_hf_config(n)[1], PlanInputs()).model["params"] for n in PRESETS}
    assert counts == {"llama-2-7b": 6_738_415_616, "mistral-7b": 7_241_732_096, "chatglm3-6b": 6_243_584_000,
                      "llama-3-8b": 8_030_261_248, "llama-3-70b": 70_553_706_496}
    glm = arch_from_hf_config(PRESETS["chatglm3-6b"])
    assert (glm.family, glm.num_query_groups, glm.vocab_size, glm.max_position_embeddings, glm.qkv_bias) == \
        ("chatglm", 2, 65024, 8192, True)
    assert arch_from_hf_config(PRESETS["mistral-7b"]).sliding_window == 4096


def test_activation_terms_by_hand():
    # h=64, a=4, g=2, d=16 (8 rotary dims), f=96; s=8, b=2 -> T=16 tokens; p=2 (bf16)
    arch = arch_from_hf_config(_glm_tiny())
    x = activations.ActivationSetup(seq=8, rows=2, tp=1, dtype_bytes=2, spec="local")
    assert activations.layer_terms(arch, x) == {
        "attn.norm_in": 8 * 16 * 64 + 4 * 16,  # torch RMSNorm: fp32 x and x * rstd, fp32 rstd
        "attn.qkv_in": 2 * 16 * 64,
        "attn.q": 2 * 16 * 64,
        "attn.kv": 2 * 2 * 16 * 64,  # K, V repeated to all 4 heads by the local attention
        "attn.scores": (4 + 2) * 4 * 8 * 16,  # fp32 softmax + bf16 probs, a s^2 b
        "attn.proj_in": 2 * 16 * 64,
        "attn.rope_mask": 4 * 8 * 8 * 2 + 8 * 8,  # cos/sin for q and k, bool causal mask
        "mlp.norm_in": 8 * 16 * 64 + 4 * 16,
        "mlp.fc1_in": 2 * 16 * 64,
        "mlp.fc1_out": 2 * 2 * 16 * 96,
        "mlp.silu_out": 2 * 16 * 96,
        "mlp.up_offset": 2 * 16 * 96,
        "mlp.fc2_in": 2 * 16 * 96,
    }
    assert activations.layer_bytes(arch, x) == 47808
    te = activations.layer_terms(arch, replace(x, spec="te"))
    # TE: norm keeps bf16 x; K at g heads + V's view keeping the [T, hq + 2 hkv] QKV output; lse only
    assert (te["attn.norm_in"], te["attn.kv"], te["attn.scores"]) == (2 * 16 * 64 + 64, 2 * 16 * (64 + 96), 256)
    assert "attn.rope_mask" not in te
    tp2 = activations.layer_terms(arch, replace(x, tp=2))
    assert (tp2["attn.norm_in"], tp2["attn.q"], tp2["mlp.fc1_out"]) == (8256, 1024, 3072)  # replicated vs split
    sp = activations.layer_terms(arch, replace(x, tp=2, sequence_parallel=True))
    assert (sp["attn.norm_in"], sp["mlp.fc1_in"]) == (4128, 1024)
    assert activations.layer_bytes(arch, replace(x, recompute="full")) == 2 * 16 * 64


def test_local_spec_layer_activations_equal_autograds_saved_tensors(tmp_path):
    """One decoder layer of a real GPTModel (local spec, CPU): the bytes of every storage autograd
    saves (parameters excluded) equal the planner's per-layer sum, for GQA, MHA (V a view of the
    QKV output) and GLM (QKV bias, half-rotary), in fp32 and bf16."""
    got = torchrun_json("plan_activations.py", 1, "--seq", "32", "--rows", "3", out=tmp_path / "a.json")
    assert len(got) == 6
    for case, measured in got.items():
        name, dtype = case.split(":")
        arch = arch_from_hf_config(tiny_hf_config(name).to_dict())
        x = activations.ActivationSetup(seq=32, rows=3, dtype_bytes=4 if dtype == "float32" else 2, spec="local")
        assert activations.layer_bytes(arch, x) == measured, case


def test_recompute_orders_none_selective_full_and_pipeline_in_flight():
    _, config = load_hf_config("llama-3-8b")
    base = PlanInputs(tp=2, pp=4, dp=1, micro_batch=1, seq=2048, spec="local")
    act = {r: [s.activations_bytes for s in stage_plans(config, replace(base, recompute=r))]
           for r in activations.RECOMPUTE}
    assert all(n > s > f for n, s, f in zip(act["none"], act["selective"], act["full"]))
    te = [s.activations_bytes for s in stage_plans(config, replace(base, spec="te"))]
    te_sel = [s.activations_bytes for s in stage_plans(config, replace(base, spec="te", recompute="selective"))]
    assert te == te_sel  # flash attention stores no scores: nothing for selective to drop
    # 1F1B: stage i holds pp - i micro-batches (8 layers each stage)
    arch = arch_from_hf_config(config)
    one = activations.layer_bytes(arch, activations.ActivationSetup(seq=2048, rows=2, tp=2, spec="local"))
    hidden = 2 * 2048 * 2 * 4096
    assert act["none"][0] == 4 * (8 * one + hidden)
    assert act["none"][2] == 2 * (8 * one + hidden)
    assert [activations.in_flight(4, i, 2) for i in range(4)] == [2, 2, 2, 1]


def test_naive_and_fused_logprob_bytes_by_hand():
    arch = arch_from_hf_config(_glm_tiny())  # V=1003 -> 1024 rows at tp=1, h=64
    n, scored, v, h = 16, 8, 1024, 64
    assert heads.naive_bytes(arch, tokens=n, tp=1, dtype_bytes=2) == \
        8 * n * v + 4 * n * h + 4 * v * h + 4 * n * h + 4 * v * h + 2 * v * h == 794624
    assert heads.fused_bytes(arch, tokens=n, scored=scored, tp=1, dtype_bytes=2) == \
        (2 * scored * h + 4 * scored) + 4 * scored * h + 2 * scored * h + 2 * n * h + 2 * v * h + 2 * scored * v
    _, config = load_hf_config("llama-3-8b")
    x = PlanInputs(tp=2, dp=2, micro_batch=1, seq=1024)
    fused = stage_plans(config, x)[0].logprob_bytes
    naive = stage_plans(config, replace(x, logprob_impl="naive"))[0].logprob_bytes
    assert naive > 2.5 * fused > 0


def test_ppo_holds_four_models_and_a_kv_cache():
    _, config = load_hf_config("mistral-7b")
    x = PlanInputs(tp=2, dp=2, micro_batch=2, seq=1024, trainer="ppo", prompt_len=512, max_new_tokens=512)
    ppo = stage_plans(config, x)[0]
    sft = stage_plans(config, replace(x, trainer="sft"))[0]
    value_params = stage_plans(config, replace(x, trainer="rm"))[0].params_bytes  # the critic / reward shape
    assert ppo.params_bytes == sft.params_bytes + value_params  # actor + critic
    assert ppo.frozen_bytes == sft.params_bytes + value_params  # reference + reward
    assert value_params < sft.params_bytes  # no [V, h] output layer, a [1, h] value head
    # K and V of 32 layers x (512 + 512) tokens x 2 prompts x 8/2 groups x 128 dims, bf16
    assert ppo.kv_cache_bytes == 2 * 32 * 1024 * 2 * 4 * 128 * 2
    assert ppo.optimizer_step_bytes == 0  # spec te: TE's FusedAdam allocates nothing
    assert ppo.total_bytes == (ppo.params_bytes + ppo.grads_bytes + ppo.optimizer_bytes + ppo.frozen_bytes
                               + max(ppo.activations_bytes + ppo.logprob_bytes, ppo.kv_cache_bytes))
    # flipguard trains the actor on policy and reference rollouts: twice the rows of constraint none
    none = stage_plans(config, replace(x, constraint="none"))[0]
    assert ppo.activations_bytes > none.activations_bytes


def test_torch_adamw_step_transient_without_te():
    """Without TE megatron-core steps torch's AdamW (foreach): sqrt(v) for every element it steps."""
    _, config = load_hf_config("llama-3-8b")
    x = PlanInputs(tp=2, dp=2, spec="local", dtype="bf16")
    rep = stage_plans(config, replace(x, optimizer="replicated"))[0]
    assert rep.optimizer_step_bytes == rep.grads_bytes == 16_061_054_976  # 4 bytes x 4.015e9 elements
    dist = stage_plans(config, replace(x, optimizer="distributed"))[0]
    assert dist.optimizer_step_bytes == dist.grads_bytes // 2  # 4 bytes x a 1/2 shard of the buffer
    assert rep.total_bytes == rep.params_bytes + rep.grads_bytes + rep.optimizer_bytes + rep.frozen_bytes + max(
        rep.activations_bytes + rep.logprob_bytes, rep.optimizer_step_bytes)


def test_dpo_reference_online_adds_a_frozen_copy():
    _, config = load_hf_config("mistral-7b")
    x = PlanInputs(tp=2, dp=2)
    pre, online = stage_plans(config, x)[0], stage_plans(config, replace(x, reference="online"))[0]
    assert pre.frozen_bytes == 2 * 4 * 1 * 1  # two fp32 log-probs per pair of the step
    assert online.frozen_bytes == online.params_bytes


def test_distributed_optimizer_shards_over_dp_with_megatron_padding():
    t = [params.ParamTensor("emb", 1000, shared_embedding=True), params.ParamTensor("a", 10),
         params.ParamTensor("b", 5)]
    assert params.grad_buffer_numel(t, dp=2, distributed_optimizer=False) == 1015
    # reversed: b at 0..5, a at 64..74; the shared embedding closes that bucket (pad to 128)
    # and gets its own: 128..1128 -> 1152
    assert params.grad_buffer_numel(t, dp=2, distributed_optimizer=True) == 1152
    _, config = load_hf_config("llama-3-8b")
    x = PlanInputs(tp=2, dp=4, dtype="bf16")
    rep = stage_plans(config, replace(x, optimizer="replicated"))[0]
    dist = stage_plans(config, replace(x, optimizer="distributed"))[0]
    assert rep.optimizer_bytes == 12 * rep.params_bytes // 2
    assert dist.optimizer_bytes == 12 * (dist.grads_bytes // 4) // 4  # master + m + v of a 1/dp shard
    assert 0 <= dist.grads_bytes - rep.grads_bytes < 4 * 64 * 300  # padding only


def test_verdict_and_largest_micro_batch():
    _, config = load_hf_config("llama-3-8b")
    x = PlanInputs(tp=2, dp=2, seq=1024, gpu="a100-80g", optimizer="distributed", recompute="full")
    result = plan(config, x)
    m = result.max_micro_batch
    assert result.fits and m >= 2
    peak = lambda mb: max(s.total_bytes for s in stage_plans(config, replace(x, micro_batch=mb)))  # noqa: E731
    assert fits(peak(m), "a100-80g") and not fits(peak(m + 1), "a100-80g")
    big = plan(load_hf_config("llama-3-70b")[1], PlanInputs(gpu="a100-40g"))
    assert (big.fits, big.max_micro_batch) == (False, 0)
    assert big.peak_bytes > GPUS["a100-40g"]


# --- CLI ---------------------------------------------------------------------------


def test_cli_table_and_json(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, str(TOOL), "--hf-config", "chatglm3-6b", "--tp", "2", "--pp", "2",
                           "--dp", "2", "--trainer", "ppo", "--gpu", "a100-80g", "--json", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for row in ("parameters", "gradients (fp32 buffer)", "optimizer", "activations", "log-prob", "frozen models",
                "KV cache", "total", "stage 0 (14 L)", "stage 1 (14 L)"):
        assert row in proc.stdout
    assert ": fits;" in proc.stdout or "does not fit" in proc.stdout
    data = json.loads(out.read_text())
    assert {"inputs", "per_stage", "peak_bytes", "gpu", "gpu_bytes", "fits", "max_micro_batch"} <= set(data)
    assert [s["stage"] for s in data["per_stage"]] == [0, 1]
    keys = {"stage", "layers", "params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes",
            "logprob_bytes", "frozen_bytes", "kv_cache_bytes", "optimizer_step_bytes", "total_bytes"}
    assert all(keys <= set(s) for s in data["per_stage"])
    assert data["peak_bytes"] == max(s["total_bytes"] for s in data["per_stage"])
    assert data["gpu"] == "a100-80g" and data["gpu_bytes"] == GPUS["a100-80g"]
    assert data["per_stage"][0]["kv_cache_bytes"] > 0 and data["per_stage"][1]["logprob_bytes"] > 0
    assert data["per_stage"][0]["logprob_bytes"] == 0


@pytest.mark.parametrize("args, message", [
    (["--hf-config", "llama-9b"], "neither a preset"),
    (["--hf-config", "/nonexistent/dir"], "neither a preset"),
    (["--hf-config", "llama-3-8b", "--tp", "3"], "must divide the model's 32 attention heads"),
    (["--hf-config", "chatglm3-6b", "--pp", "29"], "larger than the model's 28 layers"),
    (["--hf-config", "mistral-7b", "--dp", "0"], "--dp must be >= 1"),
    (["--hf-config", "mistral-7b", "--gpu", "v100"], "--gpu 'v100' is not one of"),
    (["--hf-config", "mistral-7b", "--tp", "two"], "invalid int value"),
    (["--hf-config", "mistral-7b", "--pp", "2", "--layers-per-stage", "20,20"], "sums to 40"),
])
def test_cli_errors_are_one_line(args, message, capsys):
    tool = _tool()
    with pytest.raises(SystemExit) as exc:
        sys.exit(tool.main(args))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_hf_config_dir_goes_through_the_family_reader(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["chatglm3-6b"]))
    name, config = load_hf_config(str(tmp_path))
    assert plan(config, PlanInputs()).model == plan(PRESETS["chatglm3-6b"], PlanInputs()).model
    (tmp_path / "config.json").write_text(json.dumps({**PRESETS["llama-2-7b"], "model_type": "gpt2"}))
    with pytest.raises(PlanInputError, match="model_type 'gpt2' is not supported"):
        plan(load_hf_config(str(tmp_path))[1], PlanInputs())
