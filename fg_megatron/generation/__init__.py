"""Generation: responses for prompts with megatron-core under TP x PP x DP, with a KV cache.

- :mod:`sampling`: greedy / temperature / top-k / top-p choice of the next token (pure);
- :mod:`masks`: attention masks for left-padded batches;
- :mod:`engine`: the decoding loop over megatron-core's schedule and inference context;
- :mod:`runner`: a prompt file in, a response file out (``tools/generate.py``).
"""

from fg_megatron.generation.engine import Generation, generate_ids
from fg_megatron.generation.sampling import SamplingParams, GenerationSettingsError, next_tokens, row_seed

__all__ = ["Generation", "SamplingParams", "GenerationSettingsError", "generate_ids", "next_tokens", "row_seed"]
