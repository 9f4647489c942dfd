"""Datasets (validated + tokenised up front) and the per-step micro-batch stream.

    ds = PreferenceDataset.from_file(cfg.data.train, tok, cfg.data.max_prompt_length, cfg.data.max_response_length,
                                     cfg.data.format)   # every row validated and tokenised here
    stream = MicroBatchStream.from_config(ds, cfg.data, cfg.train, dp_size=dp, dp_rank=r)
    micro_batches = stream.next_step()        # this rank's part of the next global batch
    ckpt["data"] = stream.state_dict()        # exact resume point
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from fg_megatron.data.collate import collate_pairs, collate_prompts, collate_sft, round_up
from fg_megatron.data.formats import load_prompt_records, load_preference_records, load_sft_records
from fg_megatron.data.records import PreferenceRecord, PromptRecord, SFTRecord
from fg_megatron.data.sampler import GlobalBatchSampler, split_global_batch
from fg_megatron.data.tokenize import (TokenizedExample, TokenizedPair, token_layout, tokenize_pairs,
                                       tokenize_prompts, tokenize_sfts)

if TYPE_CHECKING:
    from fg_megatron.config.schema import DataConfig, TrainConfig


class _Base:
    records: list
    items: list
    pad_id: int

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]

    @property
    def path(self) -> str:
        """The data file the records came from (their ``source`` is ``path:line``)."""
        if not self.records:
            return "the dataset"
        source = self.records[0].source
        return source.rpartition(":")[0] or source

    @property
    def lengths(self) -> list[int]:
        """Padded-row length of each sample (the longer row of a pair)."""
        return [it.length for it in self.items]

    def summary(self) -> dict:
        """Counts for a start-of-run log line: samples, longest, truncations."""
        lengths = self.lengths
        return {"samples": len(self), "max_length": max(lengths), "mean_length": sum(lengths) / len(lengths),
                "prompts_truncated": sum(bool(getattr(it, "prompt_truncated", False)) for it in self.items),
                "responses_truncated": sum(bool(getattr(it, "response_truncated", False)) for it in self.items)}


class PreferenceDataset(_Base):
    """Validated, tokenised preference pairs; ``collate`` builds DPO micro-batches ``[2b, s]``."""

    def __init__(self, records: Sequence[PreferenceRecord], tokenizer: Any, max_prompt_length: int,
                 max_response_length: int) -> None:
        self.records = list(records)
        self.items: list[TokenizedPair] = tokenize_pairs(tokenizer, self.records, max_prompt_length,
                                                         max_response_length)
        self.pad_id = token_layout(tokenizer).pad_id

    @classmethod
    def from_file(cls, path: Union[str, Path], tokenizer: Any, max_prompt_length: int, max_response_length: int,
                  format: str = "auto", chat_template: bool = False) -> "PreferenceDataset":
        return cls(load_preference_records(path, format, tokenizer, chat_template), tokenizer, max_prompt_length,
                   max_response_length)

    def collate(self, indices: Sequence[int], *, pad_multiple: int = 8, length: Optional[int] = None) -> dict:
        return collate_pairs([self.items[i] for i in indices], self.pad_id, sample_idx=indices,
                             pad_multiple=pad_multiple, length=length)


class SFTDataset(_Base):
    """Validated, tokenised prompt/response rows (a preference file gives prompt + chosen)."""

    def __init__(self, records: Sequence[SFTRecord], tokenizer: Any, max_prompt_length: int,
                 max_response_length: int) -> None:
        self.records = list(records)
        self.items: list[TokenizedExample] = tokenize_sfts(tokenizer, self.records, max_prompt_length,
                                                           max_response_length)
        self.pad_id = token_layout(tokenizer).pad_id

    @classmethod
    def from_file(cls, path: Union[str, Path], tokenizer: Any, max_prompt_length: int, max_response_length: int,
                  format: str = "auto", chat_template: bool = False) -> "SFTDataset":
        return cls(load_sft_records(path, format, tokenizer, chat_template), tokenizer, max_prompt_length,
                   max_response_length)

    def collate(self, indices: Sequence[int], *, pad_multiple: int = 8, length: Optional[int] = None) -> dict:
        return collate_sft([self.items[i] for i in indices], self.pad_id, ids=[self.records[i].id for i in indices],
                           sample_idx=indices, pad_multiple=pad_multiple, length=length)


class _PromptItem(tuple):
    @property
    def length(self) -> int:
        return len(self)


class PromptDataset(_Base):
    """Prompts for generation / evaluation, tokenised like every training prompt."""

    def __init__(self, records: Sequence[PromptRecord], tokenizer: Any, max_prompt_length: int) -> None:
        self.records = list(records)
        self.items = [_PromptItem(ids) for ids in tokenize_prompts(tokenizer, self.records, max_prompt_length)]
        self.pad_id = token_layout(tokenizer).pad_id

    @classmethod
    def from_file(cls, path: Union[str, Path], tokenizer: Any, max_prompt_length: int,
                  format: str = "auto", chat_template: bool = False) -> "PromptDataset":
        return cls(load_prompt_records(path, format, tokenizer, chat_template), tokenizer, max_prompt_length)

    def collate(self, indices: Sequence[int], *, side: str = "left", pad_multiple: int = 1) -> dict:
        batch: dict = collate_prompts([self.items[i] for i in indices], self.pad_id, side=side,
                                      pad_multiple=pad_multiple)
        batch["ids"] = [self.records[i].id for i in indices]
        return batch


class MicroBatchStream:
    """Each step: this DP rank's collated micro-batches of the next global batch.

    ``same_length`` pads every micro-batch of a step to the global batch's longest sample
    (rounded to ``pad_multiple``): one shape per step for every rank and every layout, which
    pipeline parallelism needs (its stages exchange fixed-shape activations).  Without it each
    micro-batch pads only to its own longest sample.
    """

    def __init__(self, dataset: Union[PreferenceDataset, SFTDataset], *, global_batch_size: int,
                 micro_batch_size: int, seed: int, dp_size: int = 1, dp_rank: int = 0, shuffle: bool = True,
                 group_batches: int = 16, pad_multiple: int = 8, same_length: bool = True) -> None:
        split_global_batch(range(global_batch_size), dp_size, dp_rank, micro_batch_size)  # validates the layout
        self.dataset = dataset
        self.sampler = GlobalBatchSampler(dataset.lengths, global_batch_size, seed=seed, shuffle=shuffle,
                                          group_batches=group_batches, source=dataset.path)
        self.micro_batch_size, self.dp_size, self.dp_rank = micro_batch_size, dp_size, dp_rank
        self.pad_multiple, self.same_length = pad_multiple, same_length

    @classmethod
    def from_config(cls, dataset: Union[PreferenceDataset, SFTDataset], data: "DataConfig", train: "TrainConfig", *,
                    dp_size: int = 1, dp_rank: int = 0, same_length: bool = True) -> "MicroBatchStream":
        """The stream a trainer uses: batch sizes and seed from ``train.*``, grouping from ``data.*``."""
        return cls(dataset, global_batch_size=train.global_batch_size, micro_batch_size=train.micro_batch_size,
                   seed=train.seed, dp_size=dp_size, dp_rank=dp_rank, shuffle=data.shuffle,
                   group_batches=data.group_batches, pad_multiple=data.pad_multiple, same_length=same_length)

    def next_step(self) -> list[dict]:
        """This rank's micro-batches of the next global batch (dicts from the dataset's ``collate``)."""
        batch = self.sampler.next_batch()
        length = None
        if self.same_length:
            length = round_up(max(self.dataset[i].length for i in batch), self.pad_multiple)
        return [self.dataset.collate(mb, pad_multiple=self.pad_multiple, length=length)
                for mb in split_global_batch(batch, self.dp_size, self.dp_rank, self.micro_batch_size)]

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def padding_waste(micro_batches: Sequence[dict]) -> float:
    """Fraction of the token slots in ``micro_batches`` that are padding."""
    real = sum(int(mb["lengths"].sum()) for mb in micro_batches)
    slots = sum(mb["input_ids"].numel() for mb in micro_batches)
    return 1.0 - real / slots

