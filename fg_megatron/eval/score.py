"""Sequence log-likelihoods (or a reward model's rewards) of responses given prompts, any TP x PP x DP layout.

    torchrun --nproc-per-node 2 tools/score.py --load MODEL --tp 2 --data in.jsonl --out out.jsonl

Each output row is the input row plus ``logp`` (sum over response tokens of
``log p(token | prefix)``) and ``n_tokens``.  On a value-head model (reward
model, critic) ``reward`` replaces ``logp``: the value at the row's last real
token, which is what transformers' ``*ForSequenceClassification`` returns.
Text rows are tokenised exactly as training does (BOS before the prompt, EOS
after the response); ``prompt_ids``/``response_ids`` rows are scored exactly
as given.
"""

from __future__ import annotations

from typing import Optional, Sequence

from fg_megatron import parallel
from fg_megatron.checkpoint.load import load_model
from fg_megatron.config import ConfigError
from fg_megatron.checkpoint.tokenizer import load_tokenizer
from fg_megatron.data import DataFormatError, SFTDataset
from fg_megatron.data.readers import check_output_file, read_rows, write_jsonl
from fg_megatron.logprobs import sequence_logprobs, token_logprobs
from fg_megatron.models.arch import VALUE_HEAD
from fg_megatron.models.gpt import ValueHead, sequence_scores
from fg_megatron.parallel import get_logger
from fg_megatron.schedule import run_microbatches
from fg_megatron.trainers.engine import model_dtype

log = get_logger("score")


def score_file(load: str, data: str, out: str, *, tp: int = 1, pp: int = 1, batch_size: int = 8,
               logprob_impl: str = "auto", dtype: str = "float32", seed: int = 1234,
               micro_batches_per_call: int = 16,
               layers_per_stage: Optional[Sequence[int]] = None) -> Optional[list[dict]]:
    """Score every row of ``data`` and write ``out`` (rank 0); returns the rows on rank 0.
    ``layers_per_stage``: transformer layers per pipeline stage (None: the checkpoint's split
    or the default rule, see :func:`fg_megatron.parallel.stage_layer_counts`)."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1 (got {batch_size})")
    check_output_file(out)  # before loading the model and scoring, not after
    ctx = parallel.initialize(tp, pp, seed=seed, layers_per_stage=layers_per_stage)
    model, arch, _ = load_model(load, ctx, dtype=model_dtype(dtype))
    model.eval()
    tokenizer = load_tokenizer(load)  # pads batches; tokenises text rows
    limit = arch.max_position_embeddings
    dataset = SFTDataset.from_file(data, tokenizer, limit, limit, format="sft")
    rows = {line: row for line, row in read_rows(data)}
    order = sorted(range(len(dataset)), key=lambda i: dataset[i].length)  # little padding per batch
    mine = order[ctx.dp_rank::ctx.dp]
    batches = [dataset.collate(mine[i:i + batch_size], pad_multiple=1) for i in range(0, len(mine), batch_size)]
    for i in mine:
        if dataset[i].length > limit:
            path, line = dataset.records[i].source.rsplit(":", 1)
            raise DataFormatError(path, int(line), f"{dataset[i].length} tokens, more than the model's "
                                  f"max_position_embeddings={limit}")

    key = "reward" if arch.head == VALUE_HEAD else "logp"

    def head(head, batch):
        if isinstance(head, ValueHead):  # reward model / critic: the score at each row's last real token
            seq = sequence_scores(head.values, batch["lengths"])
        else:
            logp = token_logprobs(head, batch["targets"], batch["loss_mask"], tp_group=ctx.tp_group,
                                  impl=logprob_impl)
            seq = sequence_logprobs(logp, batch["loss_mask"])
        return {"idx": batch["sample_idx"].tolist(), key: seq.double().tolist(),
                "n_tokens": batch["loss_mask"].sum(-1).long().tolist()}

    results: list[tuple[int, float, int]] = []
    for start in range(0, len(batches), micro_batches_per_call):
        chunk = batches[start:start + micro_batches_per_call]
        for stats in run_microbatches(model, chunk, head, forward_only=True):
            results.extend(zip(stats["idx"], stats[key], stats["n_tokens"]))
        log.info("scored %d/%d batches", min(start + micro_batches_per_call, len(batches)), len(batches))
    gathered = parallel.gather_to_main(ctx, results, owner=ctx.is_last_stage and ctx.tp_rank == 0)
    output = None
    if gathered is not None:
        by_idx = {i: (lp, n) for i, lp, n in gathered}
        output = []
        for i, record in enumerate(dataset.records):
            line = int(record.source.rsplit(":", 1)[1])
            lp, n = by_idx[i]
            output.append({**rows[line], key: lp, "n_tokens": n})
        write_jsonl(output, out)
        log.info("wrote %d rows to %s", len(output), out)
    parallel.shutdown()
    return output
