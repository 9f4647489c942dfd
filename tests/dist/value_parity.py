"""Value-head models under torchrun: sequence scores and parameter gradients of sum(scores).

torchrun --nproc-per-node N tests/dist/value_parity.py --tp T --pp P --plan plan.json --out result.json

plan.json: a list of {"name": str, "path": str, "head": null | "lm" | "value", "save": str or null}.
Each model is loaded with load_model(path, head=head) and runs one forward + backward of
``sum over rows of sequence_scores`` on two right-padded micro-batches of two rows each
(lengths 21, 13 and 17, 9; real tokens drawn from 1..V-1, padding id 0).  Written to the
directory of ``--out``:

    <name>.safetensors               ids [4, 21], lengths [4], scores [4]  (last stage, TP rank 0)
    <name>_grads_tpR_ppP.safetensors  each parameter's gradient under its stage-local name

    <name>.json                      head, tied or not, whether value_head is tagged TP-sharded

and, with "save", the model is saved there with save_model.  megatron-core's schedule is
driven directly (2-value loss contract), so this checks the model, not a trainer.
"""

import argparse
import json
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file

from fg_megatron import parallel
from fg_megatron.checkpoint.load import load_model, save_model
from fg_megatron.models.gpt import ValueHead, sequence_scores, stage_state_dict
from fg_megatron.schedule import position_ids_like
from tiny_models import PAD_ID

LENGTHS = ((21, 13), (17, 9))

p = argparse.ArgumentParser()
p.add_argument("--tp", type=int, default=1)
p.add_argument("--pp", type=int, default=1)
p.add_argument("--plan", required=True)
p.add_argument("--out", required=True)
args = p.parse_args()
plan = json.loads(Path(args.plan).read_text())
out_dir = Path(args.out).parent


def batches(vocab_size: int) -> list[dict]:
    g = torch.Generator().manual_seed(11)
    s = max(max(pair) for pair in LENGTHS)
    out = []
    for pair in LENGTHS:
        ids = torch.full((len(pair), s), PAD_ID, dtype=torch.long)
        for row, n in enumerate(pair):
            ids[row, :n] = torch.randint(1, vocab_size, (n,), generator=g)
        out.append({"input_ids": ids, "position_ids": position_ids_like(ids), "lengths": torch.tensor(pair)})
    return out


def forward_step(num_microbatches: int, data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["input_ids"], batch["position_ids"], None)

    def loss_func(head: ValueHead):
        assert isinstance(head, ValueHead), type(head)
        scores = sequence_scores(head.values, batch["lengths"])
        # The schedule divides by the number of micro-batches: undo it, so the gradient is
        # that of the plain sum of every row's score.
        return scores.sum() * num_microbatches, {"scores": scores.detach().clone()}

    return output, loss_func


ctx = parallel.initialize(args.tp, args.pp, seed=1)
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402

for entry in plan:
    model, arch, meta = load_model(entry["path"], ctx, dtype=torch.float32, head=entry.get("head"))
    model.train()  # dropout is 0: train mode only matters for autograd bookkeeping
    model.zero_grad(set_to_none=True)
    mbs = batches(arch.vocab_size)
    stats = get_forward_backward_func()(
        forward_step_func=partial(forward_step, len(mbs)), data_iterator=iter(mbs), model=[model],
        num_microbatches=len(mbs), seq_length=mbs[0]["input_ids"].shape[1],
        micro_batch_size=mbs[0]["input_ids"].shape[0], forward_only=False)
    grads = {n: (t.grad if t.grad is not None else torch.zeros_like(t)).detach().contiguous()
             for n, t in stage_state_dict(model).items()}
    if ctx.dp_rank == 0:
        save_file(grads, out_dir / f"{entry['name']}_grads_tp{ctx.tp_rank}_pp{ctx.pp_rank}.safetensors")
    if ctx.is_last_stage and ctx.tp_rank == 0:
        save_file({"ids": torch.cat([mb["input_ids"] for mb in mbs]),
                   "lengths": torch.cat([mb["lengths"] for mb in mbs]),
                   "scores": torch.cat([s["scores"] for s in stats])}, out_dir / f"{entry['name']}.safetensors")
        facts = {"head": arch.head, "tie": arch.tie_word_embeddings,
                 # the optimizer counts a TP-sharded tensor once per rank in the grad norm
                 "value_head_tp_sharded": getattr(model.value_head.weight, "tensor_model_parallel", None)}
        (out_dir / f"{entry['name']}.json").write_text(json.dumps(facts))
    if entry.get("save"):
        model.zero_grad(set_to_none=True)
        save_model(model, arch, meta, entry["save"], ctx)
if ctx.rank == 0:
    Path(args.out).write_text(json.dumps({"done": [e["name"] for e in plan]}))
parallel.shutdown()
