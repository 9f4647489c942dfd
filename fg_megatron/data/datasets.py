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
from fg_megatron.data.errors import DataFormatError
from fg_megatron.data.formats import load_prompt_records, load_preference_records, load_sft_records
from fg_megatron.data.records import PreferenceRecord, PromptRecord, SFTRecord
from fg_megatron.data.sampler import GlobalBatchSampler, split_global_batch
from fg_megatron.data.tokenize import (TokenizedExample, TokenizedPair, token_layout, tokenize_pairs,
                                       tokenize_prompts_full, tokenize_sfts)

if TYPE_CHECKING:
    from fg_megatron.config.schema import DataConfig, TrainConfig


ON_TRUNCATION = ("warn", "drop", "error")


def _percentiles(values: Sequence[int]) -> str:
    """``p50/p90/p99/max`` (nearest rank) of ``values``."""
    v = sorted(values)
    if not v:
        return "-"
    at = [v[min(len(v) - 1, max(0, -(-q * len(v) // 100) - 1))] for q in (50, 90, 99)]
    return "/".join(str(x) for x in at + [v[-1]])


class _Base:
    records: list
    items: list
    pad_id: int
    kind = "rows"
    parts: tuple[str, ...] = ()  # names of full_lengths' entries
    format: Optional[str] = None  # the file's format (detected or forced), when loaded from a file
    dropped: int = 0  # rows dropped by on_truncation="drop"
    limits: str = ""  # the truncation settings, for the summary

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

    @staticmethod
    def _truncation(item) -> list[str]:
        """How ``item`` was cut (empty: not at all)."""
        how = []
        if getattr(item, "prompt_truncated", False):
            how.append("prompt cut from the left")
        for part in ("chosen", "rejected"):
            if getattr(item, f"{part}_truncated", False):
                how.append(f"{part} cut on the right (no EOS)")
        if getattr(item, "response_truncated", False) and not hasattr(item, "chosen_truncated"):
            how.append("response cut on the right (no EOS)")
        return how

    def _apply_on_truncation(self, on_truncation: str, limits: str) -> None:
        """``warn``: keep every row; ``drop``: drop the truncated ones; ``error``: refuse the first."""
        if on_truncation not in ON_TRUNCATION:
            raise ValueError(f"on_truncation must be one of {', '.join(ON_TRUNCATION)}, got {on_truncation!r}")
        self.limits = limits
        cut = [i for i, it in enumerate(self.items) if self._truncation(it)]
        if not cut:
            return
        if on_truncation == "error":
            from fg_megatron.data.tokenize import _source_line

            i = cut[0]
            raise DataFormatError(*_source_line(self.records[i].source),
                                  f"{', '.join(self._truncation(self.items[i]))} by {limits} "
                                  f"({len(cut)} of {len(self.items)} rows are truncated; data.on_truncation=error); "
                                  f"raise the limits, or set data.on_truncation to warn or drop")
        if on_truncation == "drop":
            keep = sorted(set(range(len(self.items))) - set(cut))
            if not keep:
                raise DataFormatError(self.path, None, f"all {len(self.items)} rows are truncated by {limits} and "
                                                       f"data.on_truncation=drop leaves none; raise the limits")
            self.records = [self.records[i] for i in keep]
            self.items = [self.items[i] for i in keep]
            self.dropped = len(cut)

    def summary(self) -> dict:
        """Counts for a start-of-run log line: samples, longest, truncations."""
        lengths = self.lengths
        items = self.items
        out = {"samples": len(self), "max_length": max(lengths), "mean_length": sum(lengths) / len(lengths),
               "format": self.format, "dropped": self.dropped,
               "truncated": sum(bool(self._truncation(it)) for it in items),
               "prompts_truncated": sum(bool(getattr(it, "prompt_truncated", False)) for it in items),
               "responses_truncated": sum(bool(getattr(it, "response_truncated", False)) for it in items)}
        if self.kind == "pairs":
            c = [bool(it.chosen_truncated) for it in items]
            r = [bool(it.rejected_truncated) for it in items]
            out["pairs_missing_eos"] = sum(a or b for a, b in zip(c, r))
            out["pairs_one_missing_eos"] = sum(a != b for a, b in zip(c, r))
        full = [it.full_lengths for it in items if getattr(it, "full_lengths", ())]
        out["length_percentiles"] = {name: _percentiles([f[k] for f in full]) for k, name in enumerate(self.parts)}
        return out

    def summary_lines(self) -> list[str]:
        """The data summary printed before training (:meth:`log_summary`)."""
        s = self.summary()
        fmt = f"format {s['format']}" if s["format"] else "records given directly"
        rows = f"{s['samples']} {self.kind}"
        if self.dropped:
            rows += f" ({self.dropped} truncated ones dropped of {s['samples'] + self.dropped})"
        lines = [f"data {self.path}: {rows}, {fmt}",
                 "  tokens before truncation p50/p90/p99/max: "
                 + ", ".join(f"{k} {v}" for k, v in s["length_percentiles"].items())]
        if s["truncated"]:
            how = [f"{s['prompts_truncated']} prompts cut from the left (keep their end)"]
            if self.kind == "pairs":
                how.append(f"{s['pairs_missing_eos']} pairs with a response cut on the right (lost its EOS; "
                           f"in {s['pairs_one_missing_eos']} only one of the two, compared with a complete one)")
            elif self.kind != "prompts":
                how.append(f"{s['responses_truncated']} responses cut on the right (lost their EOS)")
            lines.append(f"  WARNING: {s['truncated']} of {s['samples']} {self.kind} truncated by {self.limits}: "
                         + "; ".join(how) + " (data.on_truncation=drop drops them, =error refuses them)")
        else:
            lines.append(f"  no {self.kind} truncated by {self.limits}")
        return lines

    def log_summary(self, logger: Any) -> None:
        """Log :meth:`summary_lines` (the trainers' logger prints on rank 0 only)."""
        lines = self.summary_lines()
        for line in lines[:-1]:
            logger.info("%s", line)
        (logger.warning if self.summary()["truncated"] else logger.info)("%s", lines[-1])


def _limits(max_prompt_length: int, max_response_length: Optional[int] = None, max_length: Optional[int] = None,
            truncation_mode: str = "keep_end") -> str:
    out = f"max_prompt_length={max_prompt_length}"
    if max_response_length is not None:
        out += f", max_response_length={max_response_length}"
    if max_length is not None:
        out += f", max_length={max_length} ({truncation_mode})"
    return out


class PreferenceDataset(_Base):
    """Validated, tokenised preference pairs; ``collate`` builds DPO micro-batches ``[2b, s]``."""

    kind = "pairs"
    parts = ("prompt", "chosen", "rejected")

    def __init__(self, records: Sequence[PreferenceRecord], tokenizer: Any, max_prompt_length: int,
                 max_response_length: int, *, max_length: Optional[int] = None, truncation_mode: str = "keep_end",
                 on_truncation: str = "warn") -> None:
        self.records = list(records)
        self.items: list[TokenizedPair] = tokenize_pairs(tokenizer, self.records, max_prompt_length,
                                                         max_response_length, max_length, truncation_mode,
                                                         identical="keep" if on_truncation == "drop" else "error")
        self.pad_id = token_layout(tokenizer).pad_id
        self._apply_on_truncation(on_truncation, _limits(max_prompt_length, max_response_length, max_length,
                                                         truncation_mode))

    @classmethod
    def from_file(cls, path: Union[str, Path], tokenizer: Any, max_prompt_length: int, max_response_length: int,
                  format: str = "auto", chat_template: bool = False, **truncation: Any) -> "PreferenceDataset":
        """``truncation``: ``max_length``, ``truncation_mode``, ``on_truncation`` (see ``__init__``)."""
        info: dict = {}
        ds = cls(load_preference_records(path, format, tokenizer, chat_template, info=info), tokenizer,
                 max_prompt_length, max_response_length, **truncation)
        ds.format = info.get("format")
        return ds

    def collate(self, indices: Sequence[int], *, pad_multiple: int = 8, length: Optional[int] = None) -> dict:
        return collate_pairs([self.items[i] for i in indices], self.pad_id, sample_idx=indices,
                             pad_multiple=pad_multiple, length=length)


class SFTDataset(_Base):
    """Validated, tokenised prompt/response rows (a preference file gives prompt + chosen)."""

    kind = "rows"
    parts = ("prompt", "response")

    def __init__(self, records: Sequence[SFTRecord], tokenizer: Any, max_prompt_length: int,
                 max_response_length: int, *, max_length: Optional[int] = None, truncation_mode: str = "keep_end",
                 on_truncation: str = "warn") -> None:
        self.records = list(records)
        self.items: list[TokenizedExample] = tokenize_sfts(tokenizer, self.records, max_prompt_length,
                                                           max_response_length, max_length, truncation_mode)
        self.pad_id = token_layout(tokenizer).pad_id
        self._apply_on_truncation(on_truncation, _limits(max_prompt_length, max_response_length, max_length,
                                                         truncation_mode))

    @classmethod
    def from_file(cls, path: Union[str, Path], tokenizer: Any, max_prompt_length: int, max_response_length: int,
                  format: str = "auto", chat_template: bool = False, **truncation: Any) -> "SFTDataset":
        info: dict = {}
        ds = cls(load_sft_records(path, format, tokenizer, chat_template, info=info), tokenizer, max_prompt_length,
                 max_response_length, **truncation)
        ds.format = info.get("format")
        return ds

    def collate(self, indices: Sequence[int], *, pad_multiple: int = 8, length: Optional[int] = None) -> dict:
        return collate_sft([self.items[i] for i in indices], self.pad_id, ids=[self.records[i].id for i in indices],
                           sample_idx=indices, pad_multiple=pad_multiple, length=length)


class _PromptItem(tuple):
    prompt_truncated = False
    full_lengths: tuple[int, ...] = ()

    @property
    def length(self) -> int:
        return len(self)


def _prompt_item(ids: tuple[int, ...], truncated: bool, full: int) -> _PromptItem:
    item = _PromptItem(ids)
    item.prompt_truncated, item.full_lengths = truncated, (full,)
    return item


class PromptDataset(_Base):
    """Prompts for generation / evaluation, tokenised like every training prompt."""

    kind = "prompts"
    parts = ("prompt",)

    def __init__(self, records: Sequence[PromptRecord], tokenizer: Any, max_prompt_length: int, *,
                 on_truncation: str = "warn") -> None:
        self.records = list(records)
        self.items = [_prompt_item(*x) for x in tokenize_prompts_full(tokenizer, self.records, max_prompt_length)]
        self.pad_id = token_layout(tokenizer).pad_id
        self._apply_on_truncation(on_truncation, _limits(max_prompt_length))

    @classmethod
    def from_file(cls, path: Union[str, Path], tokenizer: Any, max_prompt_length: int,
                  format: str = "auto", chat_template: bool = False, on_truncation: str = "warn") -> "PromptDataset":
        info: dict = {}
        ds = cls(load_prompt_records(path, format, tokenizer, chat_template, info=info), tokenizer, max_prompt_length,
                 on_truncation=on_truncation)
        ds.format = info.get("format")
        return ds

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

