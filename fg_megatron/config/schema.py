"""One typed config per component; a run config nests them.

YAML files in ``configs/`` and ``--set a.b=v`` overrides use these dotted names.
Each field's comment is its documentation.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal, Optional

from fg_megatron.config.loader import ConfigError
from fg_megatron.parallel import ParallelLayoutError, check_layers_per_stage

LogprobImpl = Literal["auto", "triton", "torch", "megatron"]
RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel size (must divide the model's KV heads)
    pp: int = 1  # pipeline-parallel size (at most the layers); DP = world / (tp * pp)
    # Transformer layers on each pipeline stage, e.g. [2, 1]: pp entries, each >= 1, summing to
    # the model's layers.  null: an fg checkpoint's own split at this pp, else an even split,
    # else the first layers % pp stages hold one layer more (parallel.stage_layer_counts).
    layers_per_stage: Optional[list[int]] = None
    # A collective that waits longer than this (a rank stalled, hung or dead) fails on the waiting
    # ranks and torchrun stops the job.
    timeout_minutes: float = 10.0

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ConfigError(f"parallel.tp and parallel.pp must be >= 1 (got {self.tp}, {self.pp})")
        if not self.timeout_minutes > 0:
            raise ConfigError(f"parallel.timeout_minutes must be > 0 (got {self.timeout_minutes})")
        if self.layers_per_stage is not None:
            try:
                check_layers_per_stage(self.pp, self.layers_per_stage)
            except ParallelLayoutError as exc:
                raise ConfigError(str(exc)) from None


@dataclass
class ModelConfig:
    load: str = "assets/tiny/pi0"  # HF directory or fg checkpoint to start from
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    logprob_impl: LogprobImpl = "auto"  # auto: fused Triton kernel on CUDA, chunked torch elsewhere
    vocab_pad_multiple: int = 128  # vocabulary padded to a multiple of this x TP
    # activation recomputation of trainable models (frozen ones keep no activations): none;
    # selective (megatron-core's core attention: memory of the s^2 scores, little compute);
    # full (every layer reruns its forward in the backward: ~1/3 more compute).  true/false
    # (configs written before the choice existed) read as full/none.
    recompute: str = "none"
    # Megatron's sequence parallelism (TP > 1): norms and dropout work on s/tp of the sequence.
    # Needs NCCL and Transformer Engine (megatron-core's local spec asserts under it); refused
    # on gloo / CPU before any model loads.  Not yet verified on a GPU.
    sequence_parallel: bool = False
    # lm: next-token head (policies); value: a scalar per token (reward models, critics).
    # A value model loaded from a causal-LM checkpoint gets a zero-initialised value head.
    head: Literal["lm", "value"] = "lm"

    def __post_init__(self) -> None:
        if self.vocab_pad_multiple < 1:
            raise ConfigError(f"model.vocab_pad_multiple must be >= 1 (got {self.vocab_pad_multiple})")
        # The one place old configs' boolean recompute is read (YAML true arrives here as "True").
        self.recompute = {"true": "full", "false": "none"}.get(str(self.recompute).lower(), self.recompute)
        if self.recompute not in RECOMPUTE_MODES:
            raise ConfigError(f"model.recompute must be one of {list(RECOMPUTE_MODES)} (got {self.recompute!r})")


@dataclass
class DataConfig:
    train: str = "assets/tiny/data/pref_train.jsonl"  # JSONL (or parquet) training file
    format: str = "auto"  # auto-detect from fields, or: generic, hh_rlhf, ultrafeedback, tldr, cvalues, sft, prompts
    max_prompt_length: int = 192  # prompts longer than this lose tokens from the left
    max_response_length: int = 64  # responses longer than this are cut on the right
    # prompt + response limit (TRL's DPOConfig.max_length), applied after the two above; null: none
    max_length: Optional[int] = None
    # over max_length: keep_end cuts the prompt from the left, keep_start the response on the right (TRL's meaning)
    truncation_mode: Literal["keep_end", "keep_start"] = "keep_end"
    on_truncation: Literal["warn", "drop", "error"] = "warn"  # truncated rows: count them / drop them / refuse
    shuffle: bool = True  # reshuffle each epoch (seeded by train.seed)
    chat_template: bool = False  # render plain-string prompts as a user turn with the tokenizer's chat template
    group_batches: int = 16  # sort samples by length within buffers of this many global batches (0: off)
    pad_multiple: int = 8  # micro-batch sequence length rounded up to a multiple of this (fewer shapes)
    eval: Optional[str] = None  # held-out pairs scored every train.eval_every steps (train_rm, train_dpo: eval_*)

    def truncation(self) -> dict:
        """The datasets' truncation keywords (``PreferenceDataset.from_file(..., **data.truncation())``)."""
        return {"max_length": self.max_length, "truncation_mode": self.truncation_mode,
                "on_truncation": self.on_truncation}

    def __post_init__(self) -> None:
        if self.max_prompt_length < 1 or self.max_response_length < 1:
            raise ConfigError(f"data.max_prompt_length and data.max_response_length must be >= 1 "
                              f"(got {self.max_prompt_length}, {self.max_response_length})")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"data.max_length must be >= 2 (one prompt and one response token) or null "
                              f"(got {self.max_length})")
        if self.truncation_mode not in ("keep_end", "keep_start"):
            raise ConfigError(f"data.truncation_mode must be keep_end or keep_start (got {self.truncation_mode!r})")
        if self.on_truncation not in ("warn", "drop", "error"):
            raise ConfigError(f"data.on_truncation must be warn, drop or error (got {self.on_truncation!r})")
        if self.group_batches < 0 or self.pad_multiple < 1:
            raise ConfigError(f"data.group_batches must be >= 0 and data.pad_multiple >= 1 "
                              f"(got {self.group_batches}, {self.pad_multiple})")


@dataclass
class OptimConfig:
    # Defaults for a real model (the tiny configs set their own): DPO runs default to 1e-6
    # (DPORunConfig: the DPO paper's and TRL's DPOConfig's), the other trainers to 5e-6.
    lr: float = 5e-6
    min_lr: float = 0.0  # floor of the cosine / linear decay
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 10  # linear warmup from 0 (10% of the default 100 steps)
    weight_decay: float = 0.1  # AdamW decoupled weight decay
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # max global grad norm; 0 disables clipping
    use_distributed_optimizer: bool = False  # shard optimizer state over DP (NCCL only; not yet verified on GPU)
    # model.dtype float16 only: dynamic loss scaling (halved after 2 overflowing steps, which are
    # skipped; doubled after loss_scale_window clean ones).  2^16 as torch.amp and DeepSpeed; Megatron-LM starts at 2^32 and skips
    # its first ~30 steps.
    initial_loss_scale: float = 65536.0
    loss_scale_window: int = 1000

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0 (got {self.lr}): a zero learning rate trains nothing")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr must satisfy 0 <= min_lr <= lr (got lr={self.lr}, min_lr={self.min_lr})")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.clip_grad < 0:
            raise ConfigError(f"optim.warmup_steps, optim.weight_decay and optim.clip_grad must be >= 0 (got "
                              f"{self.warmup_steps}, {self.weight_decay}, {self.clip_grad})")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1 and self.adam_eps > 0):
            raise ConfigError(f"optim.adam_beta1 and optim.adam_beta2 must be in [0, 1) and optim.adam_eps > 0 "
                              f"(got {self.adam_beta1}, {self.adam_beta2}, {self.adam_eps})")
        if not (self.initial_loss_scale >= 1 and self.loss_scale_window >= 1):
            raise ConfigError(f"optim.initial_loss_scale and optim.loss_scale_window must be >= 1 "
                              f"(got {self.initial_loss_scale}, {self.loss_scale_window})")


REPORT_TO = ("tensorboard", "wandb")


@dataclass
class TrainConfig:
    steps: Optional[int] = 100  # optimizer steps (null with train.epochs)
    # passes over data.train instead of train.steps (train_dpo): steps = ceil(epochs * rows /
    # global_batch_size), resolved once the data is read; a layer (config file, or the command
    # line) that sets one of the two clears the other's value from the layers below
    epochs: Optional[int] = None
    global_batch_size: int = 64  # samples per optimizer step, whatever the layout (the DPO paper's 64)
    micro_batch_size: int = 2  # samples per forward on one DP rank
    seed: int = 1234
    save: str = "runs/dpo"  # output directory: checkpoints, metrics.jsonl, tb/
    save_every: int = 0  # also save every N steps (0: only at the end)
    keep_last: int = 2  # checkpoints kept on disk
    log_every: int = 1  # print a progress line every N steps (metrics.jsonl gets every step)
    resume: bool = False  # continue from the latest checkpoint in `save`
    overwrite: bool = False  # start afresh in a `save` that holds an earlier run's output (deleted first)
    # fields a resumed run may change (dotted names, or a section such as `dpo`); each change is
    # applied from the resumed step and recorded in config.yaml's resume_history
    allow_change: list[str] = field(default_factory=list)
    # stop (before saving) when the weight norm changes by more than this factor in one step, or the
    # loss exceeds this factor times its recent maximum; 0 disables (NaN/inf always stops)
    divergence_factor: float = 3.0
    log_gated_ids: bool = False  # write the ids of FlipGuard-gated samples per step
    tensorboard: bool = True  # false: no tb/ whatever report_to says
    # where per-step metrics go besides metrics.jsonl: tensorboard (SAVE/tb/) and/or wandb (needs
    # `pip install wandb`; WANDB_MODE=offline logs without network); [] for metrics.jsonl only
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    eval_every: int = 0  # evaluate data.eval every N steps and at the end (0: never)
    # one GPU's peak TFLOP/s for the `mfu` metric (tflops / peak); null: the dense bf16/fp16 (or
    # fp32/TF32) peak of a recognised GPU (trainers/throughput.py), else no mfu
    peak_tflops: Optional[float] = None

    def __post_init__(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise ConfigError(f"train.steps={self.steps} and train.epochs={self.epochs} are both set; set one "
                              f"(train.steps=null to count epochs)")
        if self.steps is None and self.epochs is None:
            raise ConfigError("set train.steps or train.epochs")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"train.steps must be >= 1 (got {self.steps})")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"train.epochs must be >= 1 (got {self.epochs})")
        if self.micro_batch_size < 1 or self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"train.global_batch_size={self.global_batch_size} must be a positive multiple of "
                              f"train.micro_batch_size={self.micro_batch_size}")
        if self.resume and self.overwrite:
            raise ConfigError("train.resume and train.overwrite exclude each other: continue the run in train.save, "
                              "or delete it and start afresh")
        if self.divergence_factor != 0 and not self.divergence_factor > 1:
            raise ConfigError(f"train.divergence_factor must be > 1, or 0 to disable (got {self.divergence_factor})")
        if self.save_every < 0 or self.keep_last < 0 or self.log_every < 1 or self.eval_every < 0:
            raise ConfigError("train.save_every, train.keep_last and train.eval_every must be >= 0, "
                              "train.log_every >= 1")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ConfigError(f"train.peak_tflops must be > 0 or null (got {self.peak_tflops})")
        unknown = [r for r in self.report_to if r not in REPORT_TO]
        if unknown:
            raise ConfigError(f"train.report_to: {unknown[0]!r} is not one of {list(REPORT_TO)}")
        if "wandb" in self.report_to and importlib.util.find_spec("wandb") is None:
            raise ConfigError("train.report_to lists wandb, which is not installed: pip install wandb "
                              "(or drop it from train.report_to)")


@dataclass
class DPOConfig:
    beta: float = 0.1
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    label_smoothing: float = 0.0  # conservative DPO (sigmoid loss only)
    constraint: Literal["none", "kd", "flipguard"] = "flipguard"
    gamma: float = 0.01  # weight of the cross-entropy pull toward the chosen response
    epsilon: float = 0.0  # FlipGuard gate threshold on logp_pi0(y_c) - logp_pi(y_c)
    ce_reduction: Literal["sum", "mean"] = "sum"  # CE over response tokens: sum (paper eq. 12) or mean
    reference: Literal["precompute", "online"] = "precompute"  # precompute frees the reference model
    reference_load: Optional[str] = None  # reference checkpoint (default: model.load)

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"dpo.beta must be > 0 (got {self.beta})")
        if self.gamma < 0:
            raise ConfigError(f"dpo.gamma must be >= 0 (got {self.gamma})")
        if not 0 <= self.label_smoothing <= 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5] (got {self.label_smoothing})")
        if self.label_smoothing > 0 and self.loss_type != "sigmoid":
            raise ConfigError(f"dpo.label_smoothing applies to loss_type sigmoid only (got {self.loss_type})")


@dataclass
class SFTConfig:
    train_on_prompt: bool = False  # also put loss on prompt tokens


@dataclass
class RMConfig:
    center_rewards_coefficient: float = 0.0  # TRL's centering term: + c * (r_c + r_r)^2 per pair
    margin: bool = False  # read each pair's "margin" field and subtract it inside the sigmoid (TRL)

    def __post_init__(self) -> None:
        if not self.center_rewards_coefficient >= 0:
            raise ConfigError(f"rm.center_rewards_coefficient must be >= 0 (got {self.center_rewards_coefficient})")


@dataclass
class RewardConfig:
    source: Literal["model", "oracle"] = "model"  # oracle: the task's own judge (1 right, 0 wrong)
    load: str = "assets/tiny/rm"  # the reward model (a value-head checkpoint) when source=model


@dataclass
class PPOConfig:
    # prompts generated per iteration, a multiple of train.global_batch_size (prompts per optimizer
    # step): the default 128 gives two optimizer steps of the default 64 per rollout and epoch
    rollout_batch_size: int = 128
    epochs: int = 1  # passes over each rollout
    max_new_tokens: int = 24  # response budget of the rollout
    temperature: float = 1.0  # sampling of y_pol (and y_ref): 0 is greedy
    top_p: float = 1.0
    top_k: int = 0
    kl_coef: float = 0.1  # per-token KL penalty in the reward (DeepSpeed-Chat's fixed 0.1)
    kl_estimator: Literal["k1", "k3"] = "k1"  # k1: logp - logp0; k3: (e^x - 1) - x, x = logp0 - logp
    score_clip: Optional[float] = 5.0  # clamp R to +-this (DeepSpeed-Chat); null: no clamp
    missing_eos_penalty: Optional[float] = None  # subtracted from R when a response never reaches EOS (TRL)
    whiten_rewards: bool = False  # TRL's whiten_rewards (mean kept)
    whiten_advantages: bool = True  # advantages normalised over the whole rollout (all DP ranks)
    gae_gamma: float = 1.0  # GAE discount
    gae_lambda: float = 0.95  # GAE lambda
    clip_range: float = 0.2  # PPO ratio clip
    value_clip_range: float = 0.2  # critic: values clipped to old +- this
    critic_lr: Optional[float] = None  # critic's peak lr (default: optim.lr); its schedule follows optim.*
    critic_load: Optional[str] = None  # default: reward.load (source=model) or model.load (oracle)
    reference_load: Optional[str] = None  # pi0 (default: model.load)
    constraint: Literal["none", "kd", "flipguard"] = "flipguard"
    gamma: float = 0.01  # weight of the CE pull toward y_ref (eq. 7)
    epsilon: float = 0.1  # gate: R(x, y_ref) - R(x, y_pol) > epsilon (the paper's PPO default)
    ce_reduction: Literal["sum", "mean"] = "sum"
    log_reference_rollouts: bool = False  # generate y_ref without a constraint too (logs gate_rate)

    def __post_init__(self) -> None:
        if self.rollout_batch_size < 1 or self.epochs < 1 or self.max_new_tokens < 1:
            raise ConfigError("ppo.rollout_batch_size, ppo.epochs and ppo.max_new_tokens must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError(f"ppo.temperature >= 0, 0 < ppo.top_p <= 1, ppo.top_k >= 0 (got {self.temperature}, "
                              f"{self.top_p}, {self.top_k})")
        if not (0 <= self.gae_gamma <= 1 and 0 <= self.gae_lambda <= 1):
            raise ConfigError(f"ppo.gae_gamma and ppo.gae_lambda must be in [0, 1] (got {self.gae_gamma}, "
                              f"{self.gae_lambda})")
        if not (self.clip_range > 0 and self.value_clip_range > 0 and self.kl_coef >= 0 and self.gamma >= 0):
            raise ConfigError("ppo.clip_range and ppo.value_clip_range must be > 0, ppo.kl_coef and ppo.gamma >= 0")
        if self.critic_lr is not None and not self.critic_lr > 0:
            raise ConfigError(f"ppo.critic_lr must be > 0 (got {self.critic_lr})")
        if self.score_clip is not None and not self.score_clip > 0:
            raise ConfigError(f"ppo.score_clip must be > 0 or null (got {self.score_clip})")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ConfigError(f"ppo.missing_eos_penalty must be >= 0 or null (got {self.missing_eos_penalty})")


@dataclass
class RunConfig:
    """What every trainer's run config holds; each trainer adds its own section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _dpo_optim() -> OptimConfig:
    return OptimConfig(lr=1e-6)  # the DPO paper's and TRL DPOConfig's learning rate


@dataclass
class DPORunConfig(RunConfig):
    optim: OptimConfig = field(default_factory=_dpo_optim)
    dpo: DPOConfig = field(default_factory=DPOConfig)


@dataclass
class SFTRunConfig(RunConfig):
    sft: SFTConfig = field(default_factory=SFTConfig)


def _value_model() -> ModelConfig:
    return ModelConfig(head="value")


@dataclass
class RMRunConfig(RunConfig):
    model: ModelConfig = field(default_factory=_value_model)  # a reward model has a value head
    rm: RMConfig = field(default_factory=RMConfig)


@dataclass
class PPORunConfig(RunConfig):
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
