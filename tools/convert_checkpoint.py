"""Convert checkpoints between HF and fg_megatron layouts, streaming tensor by tensor.

    python tools/convert_checkpoint.py hf-to-fg --hf DIR --out CKPT --tp T --pp P [--head value]
    python tools/convert_checkpoint.py fg-to-hf --ckpt CKPT --out DIR [--layout chatglm]
    python tools/convert_checkpoint.py reshard --ckpt CKPT --out CKPT2 --tp T --pp P
    python tools/convert_checkpoint.py verify --ckpt DIR

``verify`` checks every file of a training checkpoint against the sha256 recorded
when it was saved (``DIR``: a run's ``--save`` directory, one ``step_N``, or its ``model/``).

``hf-to-fg`` and ``reshard`` take ``--layers-per-stage 2,1`` (transformer layers on
each pipeline stage; default: even, else the first stages get one layer more;
``reshard`` keeps the source's split when ``--pp`` is unchanged).
Every sub-command also takes ``--dtype {float32,bfloat16,float16}`` (default:
keep the checkpoint's) and ``--force`` (replace a non-empty output directory).
Outputs are written to a temporary directory and renamed into place when
complete.  The family comes from the HF ``config.json`` (``model_type``): ``llama``,
``mistral``, ``glm`` and original ChatGLM3 checkpoints (``chatglm``, also from sharded
``.bin`` files).  A GLM model is exported in transformers' ``glm`` layout unless
``--layout chatglm`` asks for the original one.  ``*ForSequenceClassification``
checkpoints with one label (reward models, critics) convert like causal LMs;
``hf-to-fg --head value`` on a causal LM seeds such a value model from it (LM head
dropped, zero value head, sequence-classification config.json).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from fg_megatron.checkpoint import convert  # noqa: E402
from fg_megatron.checkpoint.atomic import OutputExistsError  # noqa: E402
from fg_megatron.checkpoint.layout import DTYPE_NAMES  # noqa: E402
from fg_megatron.checkpoint.mapping import CheckpointMismatchError  # noqa: E402
from fg_megatron.config.cli import LAYERS_PER_STAGE_HELP, layers_per_stage_arg, option_names  # noqa: E402
from fg_megatron.models.arch import ModelConfigError  # noqa: E402
from fg_megatron.parallel import ParallelLayoutError  # noqa: E402

USER_ERRORS = (CheckpointMismatchError, ModelConfigError, ParallelLayoutError, OutputExistsError)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", type=Path, required=True, help="output directory (must not exist or be empty)")
        p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None, help="cast weights (default: keep)")
        p.add_argument("--force", action="store_true", help="replace a non-empty output directory")

    def layout(p: argparse.ArgumentParser, default: int | None) -> None:
        for flag, what in (("--tp", "tensor"), ("--pp", "pipeline")):
            p.add_argument(*option_names(flag), type=positive_int, default=default, required=default is None,
                           help=f"{what}-parallel size")
        p.add_argument("--vocab-pad-multiple", type=positive_int, default=None,
                       help="pad the vocabulary to a multiple of this x TP (default 128, or the checkpoint's)")
        p.add_argument("--layers-per-stage", type=layers_per_stage_arg, default=None, metavar="N,N,...",
                       help=LAYERS_PER_STAGE_HELP)

    p = sub.add_parser("hf-to-fg", help="HF directory -> fg checkpoint")
    p.add_argument("--hf", type=Path, required=True, help="HF model directory (config.json + safetensors; ChatGLM: or .bin)")
    p.add_argument("--head", choices=["lm", "value"], default=None,
                   help="the model's head (default: the checkpoint's own); value on a causal LM seeds a "
                        "reward model / critic with a zero value head")
    common(p)
    layout(p, 1)
    p = sub.add_parser("fg-to-hf", help="fg checkpoint -> HF directory")
    p.add_argument("--ckpt", type=Path, required=True)
    common(p)
    p.add_argument("--max-shard-size-gb", type=float, default=5.0, help="largest HF weight file")
    p.add_argument("--layout", default=None,
                   help="HF layout for families with several (chatglm: glm = transformers' GlmForCausalLM, "
                        "the default; chatglm = the original ChatGLM3 checkpoint layout)")
    p = sub.add_parser("reshard", help="fg checkpoint -> fg checkpoint for another TP x PP layout")
    p.add_argument("--ckpt", type=Path, required=True)
    common(p)
    layout(p, None)
    p = sub.add_parser("verify", help="check a training checkpoint's files against their recorded sha256")
    p.add_argument("--ckpt", type=Path, required=True,
                   help="a run's --save directory (every checkpoint in it), a step_N directory or its model/")
    return parser.parse_args(argv)


def verify(path: Path) -> None:
    from fg_megatron.checkpoint import integrity

    if not path.exists():
        raise CheckpointMismatchError(f"{path}: no such directory")
    steps = sorted(p for p in (path / "checkpoints").glob("step_*") if p.is_dir()) if (path / "checkpoints").is_dir() else [path]
    for step in steps:
        manifest, count = integrity.verify_tree(step)
        print(f"verify: {step}: {count} files match {manifest.name}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = DTYPE_NAMES[args.dtype] if getattr(args, "dtype", None) else None
    start = time.perf_counter()
    try:
        if args.command == "verify":
            verify(args.ckpt)
            return 0
        if args.command == "hf-to-fg":
            convert.hf_to_fg(args.hf, args.out, tp=args.tp, pp=args.pp, dtype=dtype, force=args.force,
                             vocab_pad_multiple=args.vocab_pad_multiple or convert.DEFAULT_VOCAB_PAD_MULTIPLE,
                             head=args.head, layers_per_stage=args.layers_per_stage)
        elif args.command == "fg-to-hf":
            convert.fg_to_hf(args.ckpt, args.out, dtype=dtype, force=args.force,
                             max_shard_bytes=int(args.max_shard_size_gb * 1024**3), layout=args.layout)
        else:
            convert.reshard(args.ckpt, args.out, tp=args.tp, pp=args.pp, dtype=dtype, force=args.force,
                            vocab_pad_multiple=args.vocab_pad_multiple, layers_per_stage=args.layers_per_stage)
    except USER_ERRORS as exc:
        print(f"convert_checkpoint.py {args.command}: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.command}: wrote {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
