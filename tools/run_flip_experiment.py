"""The tiny flip experiment: NFR / win rate / accuracy of DPO, DPO+KD and DPO+FlipGuard.

    python tools/run_flip_experiment.py                    # ~5 minutes on 2 CPU cores
    python tools/run_flip_experiment.py --steps 60 --results /tmp/quick

From the committed tiny pi0: greedy responses on the test prompts, then for each
constraint DPO with the bundled config (same seed and data), the policy's greedy
responses, and the oracle's comparison with pi0; the tiny reward model scores
both for the RM-based NFR (margin 0.1).  Writes RESULTS.json (all
numbers, commands, timings), RESULTS.md (the table) and RESULTS.png (gate_rate
and chosen-reward curves; needs matplotlib).  Intermediate files go to
--work-dir.
"""

import argparse

from fg_megatron.eval.experiment import CONSTRAINTS, ExperimentSettings, run_experiment, write_results
from fg_megatron.trainers.errors import run_cli

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = ExperimentSettings()
    p.add_argument("--pi0", default=d.pi0)
    p.add_argument("--prompts", default=d.prompts)
    p.add_argument("--config", default=d.config)
    p.add_argument("--work-dir", default=d.work_dir)
    p.add_argument("--results", default="results/tiny_flip_experiment", help="output stem (.json/.md/.png)")
    p.add_argument("--constraints", nargs="+", default=list(CONSTRAINTS), choices=CONSTRAINTS)
    p.add_argument("--nproc", type=int, default=d.nproc)
    p.add_argument("--tp", type=int, default=d.tp)
    p.add_argument("--steps", type=int, default=None, help="default: the config's")
    p.add_argument("--seed", type=int, default=None, help="default: the config's")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--reward-model", default=d.reward_model,
                   help="reward model for the RM-based NFR (margin 0.1); 'none' to skip")
    p.add_argument("--reuse", action="store_true", help="keep outputs already in --work-dir")
    a = p.parse_args()
    settings = ExperimentSettings(pi0=a.pi0, prompts=a.prompts, config=a.config, work_dir=a.work_dir,
                                  constraints=a.constraints, nproc=a.nproc, tp=a.tp, steps=a.steps, seed=a.seed,
                                  max_new_tokens=a.max_new_tokens, reuse=a.reuse,
                                  reward_model=None if a.reward_model == "none" else a.reward_model)
    run_cli(lambda: write_results(run_experiment(settings), a.results))
