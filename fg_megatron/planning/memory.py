"""Per-pipeline-stage device memory of a training run: the planner's arithmetic.

No process group and no tensors: :func:`plan` turns an HF config.json (read through the
project's own family readers, :func:`fg_megatron.models.arch_from_hf_config`) and a
layout into bytes per stage, for the worst rank of each stage (every TP rank of a stage
holds the same shapes; DP ranks are alike).

What a stage holds (``p`` = bytes of the model dtype, ``P`` = its parameter elements,
``B`` = megatron-core's grad-buffer elements, :mod:`.params`):

* parameters ``p P`` (the local spec's RMSNorm weights stay fp32 in a 16-bit model:
  4 bytes, no master copy, a grad buffer of their own);
* gradients: megatron-core DDP with ``grad_reduce_in_fp32=True`` keeps one fp32 buffer,
  ``4 B`` (``main_grad`` of every parameter is a view into it);
* optimizer (megatron-core Adam): replicated: ``m`` and ``v`` in fp32 (``8 P``) plus,
  under bf16/fp16, fp32 master weights (``4 P``); distributed: the same per element
  but over this rank's ``B / dp`` shard only (``8 B/dp`` or ``12 B/dp``);
  (torch's Adam also keeps a 4-byte ``step`` per tensor on CPU; fused GPU Adams one per
  group: not counted);
* optimizer step (transient, after the backward has freed the activations): without
  Transformer Engine (and apex) megatron-core falls back to ``torch.optim.AdamW``, whose
  multi-tensor (``foreach``) step allocates ``sqrt(v)`` for all its parameters at once:
  ``4`` bytes per element it steps.  TE's ``FusedAdam`` (``spec te``) allocates nothing;
* activations (:mod:`.activations`) and the head's buffers (:mod:`.heads`, last stage);
* frozen models: DPO ``online`` reference: its parameters ``p P``; ``precompute``: two
  fp32 log-probs per pair of the global batch (the reference is freed before training,
  and at step 0 the policy itself computes them); PPO: reference (LM) and reward
  (value head) parameters;
* PPO also: a trainable critic (value head, own fp32 grads and optimizer states) and
  the generation KV cache of megatron-core's ``StaticInferenceContext``: keys and values
  of one generation micro-batch (``micro_batch`` prompts per DP rank,
  ``fg_megatron.trainers.rollout``), ``2 L (prompt + new) M g/t d p`` per stage.

Phases do not overlap: PPO generates (KV cache), then trains the actor, then the critic;
and the optimizer step comes after the backward; so ``total = params + grads + optimizer +
frozen + max(activations + head, kv_cache, optimizer_step)``
where activations/head are those of the larger training phase.  DPO rows: ``2 M``
sequences (chosen and rejected in one forward); PPO actor rows ``2 M`` when the
reference's rollouts are trained on too (``constraint`` kd/flipguard), else ``M``;
critic rows ``M``; SFT ``M``; RM ``2 M`` pairs on a value head.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Optional

from fg_megatron.models import arch_from_hf_config
from fg_megatron.models.arch import VALUE_HEAD, ModelArch, ModelConfigError
from fg_megatron.models.gpt import DEFAULT_VOCAB_PAD_MULTIPLE
from fg_megatron.models.value import value_hf_config
from fg_megatron.parallel import ParallelLayoutError, stage_layer_counts
from fg_megatron.planning import activations, heads, params
from fg_megatron.planning.hardware import GPUS, fits, required_bytes
from fg_megatron.planning.presets import PlanInputError

TRAINERS = ("dpo", "ppo", "sft", "rm")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
OPTIMIZERS = ("replicated", "distributed")
REFERENCES = ("precompute", "online")
CONSTRAINTS = ("none", "kd", "flipguard")
MAX_SEARCH = 4096


@dataclass(frozen=True)
class PlanInputs:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    micro_batch: int = 1  # DPO/RM pairs, PPO prompts, SFT rows, per DP rank
    seq: int = 1024  # tokens per sequence (PPO: prompt + new tokens)
    trainer: str = "dpo"
    dtype: str = "bf16"
    optimizer: str = "replicated"  # the trainer's default (optim.use_distributed_optimizer: false)
    recompute: str = "none"
    logprob_impl: str = "fused"
    spec: str = "te"  # te: Transformer Engine layers (a GPU run with TE); local: megatron-core local spec
    sequence_parallel: bool = False
    layers_per_stage: Optional[tuple[int, ...]] = None
    num_microbatches: Optional[int] = None  # per step and DP rank; None: global_batch's, else pp
    global_batch: Optional[int] = None  # samples per optimizer step (all DP ranks)
    reference: str = "precompute"  # DPO
    prompt_len: Optional[int] = None  # None: seq // 2
    max_new_tokens: Optional[int] = None  # PPO; None: seq - prompt_len
    constraint: str = "flipguard"  # PPO: kd/flipguard also train on the reference's rollouts
    gpu: Optional[str] = None
    vocab_pad_multiple: int = DEFAULT_VOCAB_PAD_MULTIPLE


@dataclass
class StagePlan:
    stage: int
    layers: int
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    logprob_bytes: int
    frozen_bytes: int
    kv_cache_bytes: int
    optimizer_step_bytes: int = 0
    total_bytes: int = 0

    def __post_init__(self) -> None:
        self.total_bytes = (self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.frozen_bytes
                            + max(self.activations_bytes + self.logprob_bytes, self.kv_cache_bytes,
                                  self.optimizer_step_bytes))


@dataclass
class Plan:
    inputs: dict
    model: dict
    per_stage: list[StagePlan]
    gpu: Optional[str]
    gpu_bytes: Optional[int]
    fits: Optional[bool]
    max_micro_batch: Optional[int]
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return max(s.total_bytes for s in self.per_stage)

    def to_dict(self) -> dict:
        return {"inputs": self.inputs, "model": self.model, "per_stage": [asdict(s) for s in self.per_stage],
                "peak_bytes": self.peak_bytes, "required_bytes": required_bytes(self.peak_bytes), "gpu": self.gpu,
                "gpu_bytes": self.gpu_bytes, "fits": self.fits, "max_micro_batch": self.max_micro_batch,
                "notes": self.notes}


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise PlanInputError(f"--{name} {value!r} is not one of {', '.join(map(str, allowed))}")


def check_inputs(x: PlanInputs, arch: ModelArch) -> None:
    """One clear message for a layout or setting the trainer could not run."""
    for name, value, allowed in (("trainer", x.trainer, TRAINERS), ("dtype", x.dtype, DTYPE_BYTES),
                                 ("optimizer", x.optimizer, OPTIMIZERS),
                                 ("recompute", x.recompute, activations.RECOMPUTE),
                                 ("logprob-impl", x.logprob_impl, heads.LOGPROB_IMPLS),
                                 ("spec", x.spec, activations.SPECS),
                                 ("reference", x.reference, REFERENCES), ("constraint", x.constraint, CONSTRAINTS)):
        _choice(name, value, allowed)
    if x.gpu is not None:
        _choice("gpu", x.gpu, GPUS)
    for name, value in (("tp", x.tp), ("pp", x.pp), ("dp", x.dp), ("micro-batch", x.micro_batch), ("seq", x.seq)):
        if value < 1:
            raise PlanInputError(f"--{name} must be >= 1 (got {value})")
    if arch.num_attention_heads % x.tp or arch.num_query_groups % x.tp:
        raise PlanInputError(f"--tp {x.tp} must divide the model's {arch.num_attention_heads} attention heads and "
                             f"{arch.num_query_groups} key/value heads (query groups)")
    if arch.ffn_hidden_size % x.tp:
        raise PlanInputError(f"--tp {x.tp} does not divide ffn_hidden_size {arch.ffn_hidden_size}")
    try:
        stage_layer_counts(arch.num_layers, x.pp, x.layers_per_stage)
    except ParallelLayoutError as exc:
        raise PlanInputError(str(exc)) from None
    prompt, new = sequence_split(x)
    if prompt < 1 or new < 1:
        raise PlanInputError(f"prompt ({prompt}) and response ({new}) tokens must both be >= 1 "
                             f"(--seq {x.seq}, --prompt-len, --max-new-tokens)")
    if x.num_microbatches is not None and x.num_microbatches < 1:
        raise PlanInputError(f"--num-microbatches must be >= 1 (got {x.num_microbatches})")
    if x.global_batch is not None and x.global_batch % (x.micro_batch * x.dp):
        raise PlanInputError(f"--global-batch {x.global_batch} is not a multiple of micro batch x dp = "
                             f"{x.micro_batch} x {x.dp}")


def sequence_split(x: PlanInputs) -> tuple[int, int]:
    """(prompt tokens, response tokens) of one sequence."""
    prompt = x.prompt_len if x.prompt_len is not None else x.seq // 2
    if x.trainer == "ppo" and x.max_new_tokens is not None:
        return prompt, x.max_new_tokens
    return prompt, x.seq - prompt


def num_microbatches(x: PlanInputs) -> int:
    if x.num_microbatches is not None:
        return x.num_microbatches
    if x.global_batch is not None:
        return max(1, x.global_batch // (x.micro_batch * x.dp))
    return x.pp  # enough to fill the pipeline: the 1F1B worst case


def value_arch(hf_config: dict) -> ModelArch:
    """The value-head model (reward model, critic) a causal LM seeds, as the loader builds it.

    THUDM's original ChatGLM layout takes no value head (the trainer asks for a conversion
    to transformers' ``glm`` layout first); that conversion keeps every shape, so the
    planner sizes the converted model: the LM's arch with a value head and nothing tied."""
    try:
        return arch_from_hf_config(value_hf_config(hf_config, 0))
    except ModelConfigError:
        if hf_config.get("model_type") != "chatglm":
            raise
        return dataclasses.replace(arch_from_hf_config(hf_config), head=VALUE_HEAD, tie_word_embeddings=False)


def _model_state(arch: ModelArch, x: PlanInputs, stage: int, layers: int, *, trainable: bool
                 ) -> tuple[int, int, int, int]:
    """(params, grads, optimizer, optimizer-step transient) bytes of one model on one rank of ``stage``."""
    p = DTYPE_BYTES[x.dtype]
    tensors = params.stage_params(arch, tp=x.tp, pp=x.pp, stage=stage, layers=layers,
                                  vocab_pad_multiple=x.vocab_pad_multiple, norms_fp32=x.spec == "local")
    # fp32 tensors in a 16-bit model (local-spec norm weights) have no master copy and a
    # grad buffer of their own (megatron-core buffers group parameters by dtype)
    low = [t for t in tensors if p < 4 and not t.fp32]
    high = [t for t in tensors if not (p < 4 and not t.fp32)]
    params_bytes = p * sum(t.numel for t in low) + 4 * sum(t.numel for t in high)
    if not trainable:
        return params_bytes, 0, 0, 0
    distributed = x.optimizer == "distributed" and x.dp > 1
    buf_low, buf_high = (params.grad_buffer_numel(g, dp=x.dp, distributed_optimizer=distributed) if g else 0
                         for g in (low, high))
    if distributed:  # this rank's 1/dp shard of each buffer: m, v (+ fp32 master of 16-bit params)
        optimizer = (12 * buf_low + 8 * buf_high) // x.dp
        stepped = (buf_low + buf_high) // x.dp
    else:
        optimizer = 12 * sum(t.numel for t in low) + 8 * sum(t.numel for t in high)
        stepped = sum(t.numel for t in tensors)
    step = 0 if x.spec == "te" else 4 * stepped  # torch AdamW's foreach sqrt(v)
    return params_bytes, 4 * (buf_low + buf_high), optimizer, step


def _phase(arch: ModelArch, x: PlanInputs, *, rows: int, seq: int, scored: int, stage: int, layers: int,
           mbs: int) -> tuple[int, int]:
    """(activations, head buffer) bytes of one training phase on ``stage``."""
    setup = activations.ActivationSetup(seq=seq, rows=rows, tp=x.tp, dtype_bytes=DTYPE_BYTES[x.dtype],
                                        recompute=x.recompute, spec=x.spec,
                                        sequence_parallel=x.sequence_parallel)
    act = activations.stage_bytes(arch, setup, layers=layers, pp=x.pp, stage=stage, num_microbatches=mbs)
    if stage != x.pp - 1:
        return act, 0
    tokens = rows * seq
    if arch.head == "value":
        return act, heads.value_head_bytes(arch, tokens=tokens)
    return act, heads.lm_head_bytes(x.logprob_impl, arch, tokens=tokens, scored=rows * scored, tp=x.tp,
                                    dtype_bytes=DTYPE_BYTES[x.dtype], vocab_pad_multiple=x.vocab_pad_multiple)


def stage_plans(hf_config: dict, x: PlanInputs) -> list[StagePlan]:
    arch = arch_from_hf_config(hf_config)
    check_inputs(x, arch)
    counts = stage_layer_counts(arch.num_layers, x.pp, x.layers_per_stage)
    prompt, new = sequence_split(x)
    mbs = num_microbatches(x)
    p = DTYPE_BYTES[x.dtype]
    out = []
    for stage, layers in enumerate(counts):
        prm, grd, opt, step = _model_state(arch, x, stage, layers, trainable=True)
        frozen = kv = 0
        if x.trainer == "ppo":
            seq = prompt + new
            critic = value_arch(hf_config)
            c_prm, c_grd, c_opt, c_step = _model_state(critic, x, stage, layers, trainable=True)
            prm, grd, opt, step = prm + c_prm, grd + c_grd, opt + c_opt, max(step, c_step)  # steps in turn
            frozen = _model_state(arch, x, stage, layers, trainable=False)[0] \
                + _model_state(critic, x, stage, layers, trainable=False)[0]
            actor_rows = x.micro_batch * (1 if x.constraint == "none" else 2)
            phases = [_phase(arch, x, rows=actor_rows, seq=seq, scored=new, stage=stage, layers=layers, mbs=mbs),
                      _phase(critic, x, rows=x.micro_batch, seq=seq, scored=new, stage=stage, layers=layers, mbs=mbs)]
            act, head = max(phases, key=sum)
            kv = 2 * layers * seq * x.micro_batch * (arch.num_query_groups // x.tp) * arch.head_dim * p
        else:
            if x.trainer == "rm":
                arch_t = arch if arch.head == "value" else value_arch(hf_config)
                prm, grd, opt, step = _model_state(arch_t, x, stage, layers, trainable=True)
            else:
                arch_t = arch
            rows = x.micro_batch * (2 if x.trainer in ("dpo", "rm") else 1)
            act, head = _phase(arch_t, x, rows=rows, seq=x.seq, scored=new, stage=stage, layers=layers, mbs=mbs)
            if x.trainer == "dpo":
                if x.reference == "online":
                    frozen = _model_state(arch, x, stage, layers, trainable=False)[0]
                elif stage == x.pp - 1:
                    frozen = 2 * 4 * x.micro_batch * mbs  # chosen/rejected fp32 log-probs of a step
        out.append(StagePlan(stage=stage, layers=layers, params_bytes=prm, grads_bytes=grd, optimizer_bytes=opt,
                             activations_bytes=act, logprob_bytes=head, frozen_bytes=frozen, kv_cache_bytes=kv,
                             optimizer_step_bytes=step))
    return out


def max_micro_batch(hf_config: dict, x: PlanInputs) -> Optional[int]:
    """Largest micro batch (same layout and micro-batch count) that fits ``x.gpu``; 0 if none does."""
    if x.gpu is None:
        return None

    def ok(m: int) -> bool:
        y = PlanInputs(**{**asdict(x), "micro_batch": m, "global_batch": None,
                          "num_microbatches": num_microbatches(x)})
        return fits(max(s.total_bytes for s in stage_plans(hf_config, y)), x.gpu)

    if not ok(1):
        return 0
    lo, hi = 1, 2
    while hi <= MAX_SEARCH and ok(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, MAX_SEARCH + 1)
    while hi - lo > 1:  # ok(lo), not ok(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def plan(hf_config: dict, x: PlanInputs, source: str = "") -> Plan:
    """The memory plan of one run layout (raises PlanInputError / ModelConfigError on bad input)."""
    try:
        arch = arch_from_hf_config(hf_config)
    except ModelConfigError as exc:
        raise PlanInputError(str(exc)) from None
    stages = stage_plans(hf_config, x)
    peak = max(s.total_bytes for s in stages)
    notes = []
    if x.optimizer == "distributed" and x.dp > 1:
        notes.append("distributed optimizer: needs NCCL (gloo runs fall back to replicated)")
    prompt, new = sequence_split(x)
    inputs = {**asdict(x), "hf_config": source, "num_microbatches_resolved": num_microbatches(x),
              "prompt_tokens": prompt, "response_tokens": new}
    model = {"family": arch.family, "layers": arch.num_layers, "hidden": arch.hidden_size,
             "ffn_hidden": arch.ffn_hidden_size, "heads": arch.num_attention_heads,
             "query_groups": arch.num_query_groups, "head_dim": arch.head_dim, "vocab": arch.vocab_size,
             "tied_embeddings": arch.tie_word_embeddings,
             "params": sum(t.numel for t in params.stage_params(arch, tp=1, pp=1, stage=0,
                                                                 layers=arch.num_layers))}
    return Plan(inputs=inputs, model=model, per_stage=stages, gpu=x.gpu,
                gpu_bytes=GPUS[x.gpu] if x.gpu else None, fits=fits(peak, x.gpu),
                max_micro_batch=max_micro_batch(hf_config, x), notes=notes)
