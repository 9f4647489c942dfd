"""The tokenizer that belongs to a model: from an HF directory or an fg checkpoint
(whose ``hf/`` folder keeps the source's tokenizer files)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from fg_megatron.checkpoint.layout import HF_FILES_DIR, is_fg_checkpoint
from fg_megatron.checkpoint.mapping import CheckpointMismatchError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tokenizer_config.json")


def tokenizer_dir(path: Path | str) -> Path:
    """The directory holding the tokenizer files of a model path."""
    path = Path(path)
    return path / HF_FILES_DIR if is_fg_checkpoint(path) else path


def load_tokenizer(path: Path | str, **kwargs):
    """``transformers.AutoTokenizer`` for an HF directory or an fg checkpoint."""
    from transformers import AutoTokenizer

    directory = tokenizer_dir(path)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointMismatchError(
            f"{path}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)} in {directory})"
        )
    from fg_megatron.models.chatglm.tokenizer import is_chatglm_tokenizer_dir, load_chatglm_tokenizer

    if is_chatglm_tokenizer_dir(directory):  # ChatGLM3's remote-code class, reimplemented: no trust_remote_code
        return load_chatglm_tokenizer(directory, **kwargs)
    return AutoTokenizer.from_pretrained(str(directory), **kwargs)


def tokenizer_pad_id(path: Path | str) -> Optional[int]:
    """The pad token id of a model path's tokenizer; None when it has no tokenizer files or no pad token."""
    directory = tokenizer_dir(path)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return None
    return load_tokenizer(path).pad_token_id
