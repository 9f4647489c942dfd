"""Responses for a file of prompts, under any TP x PP x DP layout (the body of tools/generate.py).

Prompts are tokenised exactly as in training (BOS + prompt, cut on the left),
sorted by length and dealt to the DP ranks; each rank generates its share in
batches (:func:`fg_megatron.generation.engine.generate_ids`); global rank 0
gathers the responses and writes the output atomically, in input order.  Each
output row is the input row plus ``response`` (decoded text, EOS excluded),
``prompt_ids`` (the prompt as the model saw it, BOS included) and
``response_ids`` (EOS included when generated, as training tokenises a
response), so the row goes straight to ``tools/score.py``, and
``finish_reason`` (``eos`` or ``length``).  Pre-tokenised rows
(``prompt_ids``, no text needed) are generated from exactly those ids (no BOS
added, never cut); their output rows keep ``prompt_ids`` and gain the rest, so
an output file can also be fed back in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from fg_megatron import parallel
from fg_megatron.checkpoint.load import load_model
from fg_megatron.checkpoint.tokenizer import load_tokenizer, tokenizer_dir
from fg_megatron.data import PromptDataset
from fg_megatron.data.readers import check_output_file, read_rows, write_jsonl
from fg_megatron.data.tokenize import token_layout
from fg_megatron.generation.engine import Generation, generate_ids, pick_backend
from fg_megatron.generation.sampling import GenerationSettingsError, SamplingParams, row_seed
from fg_megatron.parallel import get_logger

log = get_logger("generate")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_batches(lengths: Sequence[int], indices: Sequence[int], batch_size: int, *,
                 equal_length: bool = False) -> list[list[int]]:
    """``indices`` sorted by prompt length (little padding) and cut into batches of
    ``batch_size``; ``equal_length`` also cuts wherever the length changes (sliding-window
    models must not see padding: megatron-core replaces their mask)."""
    if batch_size < 1:
        raise GenerationSettingsError(f"--batch-size must be >= 1, got {batch_size}")
    order = sorted(indices, key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if (not batches or len(batches[-1]) == batch_size
                or (equal_length and lengths[batches[-1][0]] != lengths[i])):
            batches.append([])
        batches[-1].append(i)
    return batches


def eos_token_ids(tokenizer: Any, model_path: Path | str) -> list[int]:
    """The tokenizer's EOS plus any ``eos_token_id`` of the model's ``generation_config.json``."""
    ids = {token_layout(tokenizer).eos_id}
    config = tokenizer_dir(model_path) / "generation_config.json"
    if config.is_file():
        extra = json.loads(config.read_text(encoding="utf-8")).get("eos_token_id")
        ids.update(extra if isinstance(extra, list) else [] if extra is None else [extra])
    return sorted(int(i) for i in ids)


def decode(tokenizer: Any, ids: Sequence[int], eos_ids: Sequence[int]) -> str:
    """Response text: the ids before the first EOS, special tokens skipped."""
    ids = list(ids)
    cut = next((k for k, t in enumerate(ids) if t in set(eos_ids)), len(ids))
    return tokenizer.decode(ids[:cut], skip_special_tokens=True)


def generate_file(load: str, prompts: str, out: str, *, tp: int = 1, pp: int = 1, max_new_tokens: int = 64,
                  temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 1234,
                  batch_size: int = 32, max_prompt_length: Optional[int] = None, use_cache: bool = True,
                  dtype: str = "float32", backend: str = "auto",
                  layers_per_stage: Optional[Sequence[int]] = None) -> Optional[list[dict]]:
    """Generate a response for every row of ``prompts`` and write ``out`` (rank 0); returns the
    rows on rank 0.  Sampling (``temperature > 0``) draws each prompt's tokens from a generator
    seeded by ``(seed, its line)``: the same seed gives the same responses for any layout."""
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    check_output_file(out)  # before loading the model and generating, not after
    if max_new_tokens < 1:
        raise GenerationSettingsError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if dtype not in _DTYPES:
        raise GenerationSettingsError(f"--dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    ctx = parallel.initialize(tp, pp, seed=seed, layers_per_stage=layers_per_stage)
    model, arch, _ = load_model(load, ctx, dtype=_DTYPES[dtype])
    model.eval()
    try:
        pick_backend(model, ctx, backend, use_cache)
    except ValueError as e:
        raise GenerationSettingsError(f"--backend {backend}: {e}") from None
    tokenizer = load_tokenizer(load)
    limit = arch.max_position_embeddings
    if max_prompt_length is None:
        max_prompt_length = limit - max_new_tokens
    if max_prompt_length + max_new_tokens > limit or max_prompt_length < 2:
        raise GenerationSettingsError(f"max_prompt_length={max_prompt_length} + max_new_tokens={max_new_tokens} must "
                                      f"fit the model's max_position_embeddings={limit} with room for a prompt; "
                                      f"lower --max-new-tokens or --max-prompt-length")
    dataset = PromptDataset.from_file(prompts, tokenizer, max_prompt_length)
    rows = {line: row for line, row in read_rows(prompts)}
    lines = [int(r.source.rsplit(":", 1)[1]) for r in dataset.records]
    eos_ids = eos_token_ids(tokenizer, load)
    lengths = [len(item) for item in dataset.items]
    mine = list(range(len(dataset)))[ctx.dp_rank::ctx.dp]
    batches = make_batches(lengths, mine, batch_size, equal_length=arch.sliding_window is not None)
    results: list[tuple[int, list[int], str]] = []
    for n, idx in enumerate(batches):
        gens: list[Generation] = generate_ids(
            model, ctx, [dataset.items[i] for i in idx], eos_ids=eos_ids, pad_id=dataset.pad_id,
            max_new_tokens=max_new_tokens, sampling=sampling, seeds=[row_seed(seed, lines[i]) for i in idx],
            use_cache=use_cache, backend=backend)
        results.extend((i, g.ids, g.finish_reason) for i, g in zip(idx, gens))
        log.info("generated %d/%d batches", n + 1, len(batches))
    gathered = parallel.gather_to_main(ctx, results, owner=ctx.is_last_stage and ctx.tp_rank == 0)
    output = None
    if gathered is not None:
        by_idx = {i: (ids, reason) for i, ids, reason in gathered}
        output = []
        for i, line in enumerate(lines):
            ids, reason = by_idx[i]
            output.append({**rows[line], "response": decode(tokenizer, ids, eos_ids),
                           "prompt_ids": list(dataset.items[i]), "response_ids": ids, "finish_reason": reason})
        write_jsonl(output, out)
        log.info("wrote %d rows to %s", len(output), out)
    parallel.shutdown()
    return output
