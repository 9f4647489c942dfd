"""load_model / save_model under torchrun: logits of loaded models, saved checkpoints.

torchrun --nproc-per-node N tests/dist/checkpoint_load.py --plan plan.json --out result.json

plan.json: a list of phases, each {"tp": T, "pp": P, "layers_per_stage": [int] (optional),
"load": [{"name": str, "path": str, "save": str or null}], "refuse": [str]}, run one after
the other (T x P = N).
For each "load" entry the model is loaded from ``path`` (HF dir or fg checkpoint),
its logits on fixed ids are written to ``<out dir>/<name>.safetensors`` and, if
"save" is set, it is saved there with save_model.  Each "refuse" path must fail
to load with a CheckpointMismatchError whose message goes into the result.
"""

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from fg_megatron import parallel
from fg_megatron.checkpoint.load import load_model, save_model
from fg_megatron.checkpoint.mapping import CheckpointMismatchError
from fg_megatron.logprobs import full_logits
from fg_megatron.schedule import position_ids_like, run_microbatches

p = argparse.ArgumentParser()
p.add_argument("--plan", required=True)
p.add_argument("--out", required=True)
args = p.parse_args()
phases = json.loads(Path(args.plan).read_text())
out_dir = Path(args.out).parent

result = {"refused": {}}
for phase in phases:
    ctx = parallel.initialize(phase["tp"], phase["pp"], seed=1, layers_per_stage=phase.get("layers_per_stage"))
    for entry in phase["load"]:
        model, arch, meta = load_model(entry["path"], ctx, dtype=torch.float32)
        model.eval()
        ids = torch.randint(0, arch.vocab_size, (2, 13), generator=torch.Generator().manual_seed(3))
        mbs = [{"input_ids": ids[i:i + 1], "position_ids": position_ids_like(ids[i:i + 1])} for i in range(2)]
        outs = run_microbatches(
            model, mbs, lambda head, b: {"logits": full_logits(head, ctx.tp_group)},
            forward_only=True)
        if ctx.is_last_stage and ctx.tp_rank == 0:
            save_file({"ids": ids, "logits": torch.cat([o["logits"] for o in outs])},
                      out_dir / f"{entry['name']}.safetensors")
        if entry.get("save"):
            save_model(model, arch, meta, entry["save"], ctx, extra={"step": 7})
    for path in phase.get("refuse", []):
        try:
            load_model(path, ctx)
        except CheckpointMismatchError as exc:
            result["refused"][path] = str(exc)
if ctx.rank == 0:
    Path(args.out).write_text(json.dumps(result))
parallel.shutdown()
