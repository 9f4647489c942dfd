"""Rebuild the bundled tiny task data and tokenizer (deterministic from --seed).

    python tools/make_tiny_assets.py                 # writes assets/tiny/data/*.jsonl and assets/tiny/tokenizer/

The task and the oracle that judges it live in fg_megatron/data/tiny_task.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fg_megatron.data import PreferenceDataset, PromptDataset, SFTDataset  # noqa: E402
from fg_megatron.data.tiny_assets import build_tiny_assets  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="assets/tiny", help="output directory (default: assets/tiny)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=1024)
    args = ap.parse_args(argv)

    files = build_tiny_assets(args.out, seed=args.seed, vocab_size=args.vocab_size)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(files["tokenizer"]))
    print(f"tokenizer: {files['tokenizer']} ({len(tok)} tokens)")
    for name, cls in (("sft_train", SFTDataset), ("pref_train", PreferenceDataset), ("pref_eval", PreferenceDataset),
                      ("test_prompts", PromptDataset)):
        args_ = (files[name], tok, 48) if cls is PromptDataset else (files[name], tok, 48, 16)
        summary = cls.from_file(*args_).summary()
        print(f"{name}: {files[name]} ({files[name].stat().st_size / 1024:.0f} KiB) {json.dumps(summary)}")


if __name__ == "__main__":
    main()
