"""Checkpoints: HF <-> fg conversion, TP/PP resharding, model save/load.

    mapping         tensor-level HF <-> megatron names <-> per-rank shards
    safetensors_io  lazy safetensors reads, streamed writes (one tensor at a time)
    hf              HF directories: config.json, weights (never unpickled), side files
    chatglm_io      original ChatGLM .bin shards via torch.load(weights_only=True)
    layout          the fg checkpoint on disk: metadata, shard files, validation
    atomic          temp-dir-and-rename outputs
    convert         hf_to_fg, fg_to_hf, reshard (streamed)
    load            load_model / save_model for live megatron-core models
    value_seed      a value model (reward model / critic) seeded from a causal LM
    tokenizer       load_tokenizer
"""
