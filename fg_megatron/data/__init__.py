"""Preference / SFT / prompt data: formats, validation, tokenisation, batching, the tiny task.

- :mod:`formats` reads the supported shapes into records, validating every row up front;
- :mod:`tokenize` is the one tokenisation (prompt cut on the left, response + EOS cut on the right);
- :mod:`collate` builds megatron micro-batches (``input_ids/position_ids/targets/loss_mask``);
- :mod:`sampler` makes length-grouped, resumable global batches and splits them over DP ranks;
- :mod:`datasets` ties these together; :mod:`tiny_task` is the bundled task and its oracle.
"""

from fg_megatron.data.collate import collate_pairs, collate_prompts, collate_sequences, collate_sft
from fg_megatron.data.datasets import (MicroBatchStream, PreferenceDataset, PromptDataset, SFTDataset,
                                       padding_waste)
from fg_megatron.data.errors import DataFormatError
from fg_megatron.data.formats import (FORMATS, detect_format, load_preference_records, load_prompt_records,
                                      load_records, load_sft_records)
from fg_megatron.data.records import PreferenceRecord, PromptRecord, SFTRecord
from fg_megatron.data.sampler import GlobalBatchSampler, split_global_batch
from fg_megatron.data.tokenize import (TokenizedExample, TokenizedPair, decode_response, encode_prompts,
                                       encode_responses, token_layout, tokenize_example, tokenize_examples,
                                       tokenize_pair, tokenize_pairs, tokenize_prompt, tokenize_prompts,
                                       tokenize_sft, tokenize_sfts)

__all__ = [
    "DataFormatError", "FORMATS", "GlobalBatchSampler", "MicroBatchStream", "PreferenceDataset",
    "PreferenceRecord", "PromptDataset", "PromptRecord", "SFTDataset", "SFTRecord", "TokenizedExample",
    "TokenizedPair", "collate_pairs", "collate_prompts", "collate_sequences", "collate_sft", "decode_response",
    "detect_format", "encode_prompts", "encode_responses", "tokenize_examples", "tokenize_pairs",
    "tokenize_prompts", "tokenize_sfts", "load_preference_records", "load_prompt_records", "load_records", "load_sft_records",
    "padding_waste", "split_global_batch", "token_layout", "tokenize_example", "tokenize_pair",
    "tokenize_prompt", "tokenize_sft",
]
