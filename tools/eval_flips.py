"""Negative-flip rate, win rate and tie rate between pi0's and pi's responses to the same prompts.

    python tools/eval_flips.py --pi0 PI0.jsonl --pi PI.jsonl --judge tiny [--out summary.json] [--plot scatter.png]
    python tools/eval_flips.py --pi0 PI0.jsonl --pi PI.jsonl --score-field reward [--margin 0.1]

Rows are matched by "id" (or by position when rows have none) and must share
their prompts.  --judge task scores each "response" by the row's answer / match (a task
directory's test rows, fg_megatron/eval/task_dir.py); --judge tiny with the tiny task's oracle
(1 right, 0 wrong; a negative flip is pi0 right and pi wrong); --score-field
reads a number from each row (e.g. reward-model scores; a flip is
score(pi) < score(pi0) - margin, margin 0.1 by default).  Prints a table
overall and per --group-by field ("category" when present), writes a JSON
summary (--out) and a scatter plot (--plot, needs matplotlib).
"""

import argparse

from fg_megatron.config import ConfigError
from fg_megatron.config.cli import HelpFormatter
from fg_megatron.data.readers import check_output_file
from fg_megatron.eval.flips import JUDGES, compare, format_table, load_rows, write_json
from fg_megatron.eval.plots import MISSING, flip_scatter, have_matplotlib
from fg_megatron.trainers.errors import run_cli


def main(a: argparse.Namespace) -> None:
    for path, flag in ((a.out, "--out"), (a.plot, "--plot")):
        if path:
            check_output_file(path, flag)  # now, not after the evaluation
    if a.plot and not have_matplotlib():
        raise ConfigError("--plot needs matplotlib, which is not installed: pip install -e '.[plot]'")
    report = compare(load_rows(a.pi0), load_rows(a.pi), judge=a.judge, score_field=a.score_field, margin=a.margin,
                     group_by=None if a.group_by == "none" else a.group_by)
    print(format_table(report))
    if a.out:
        write_json(report.summary(), a.out)
        print(f"summary written to {a.out}")
    if a.plot:
        print(f"scatter plot written to {a.plot}" if flip_scatter(report, a.plot, a.title) else MISSING)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--pi0", required=True, metavar="FILE", help="pi0's responses (JSONL, from tools/generate.py)")
    p.add_argument("--pi", required=True, metavar="FILE", help="pi's responses to the same prompts")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--judge", choices=sorted(JUDGES), help="programmatic judge of each response")
    how.add_argument("--score-field", metavar="FIELD", help="numeric field holding each response's score")
    p.add_argument("--margin", type=float, default=None, metavar="X",
                   help="default: 0 with --judge, 0.1 with --score-field")
    p.add_argument("--group-by", default="auto", metavar="FIELD",
                   help="row field to break results down by ('none': off)")
    p.add_argument("--out", metavar="FILE", help="JSON summary")
    p.add_argument("--plot", metavar="FILE", help="PNG scatter of score(pi0) against score(pi)")
    p.add_argument("--title", default="", help="plot title")
    a = p.parse_args()
    if a.margin is not None and a.margin < 0:
        p.error(f"--margin must be >= 0, got {a.margin}")
    run_cli(lambda: main(a))
