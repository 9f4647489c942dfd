"""Evaluation: scoring, negative flips, plots, the flip study.

    score       sequence log-likelihood of rows under any layout (tools/score.py)
    flips       NFR / win / tie rates between pi0's and pi's responses (tools/eval_flips.py)
    plots       optional matplotlib PNGs: flip scatter, training curves
    task_dir    a verifiable task as data: sft / pref / test .jsonl, answers judged by match rules
    experiment  the flip study: every method x seeds from one pi0 on a task directory, mean ± std,
                paired bootstrap, gamma sweep, RM-based NFR (tools/run_flip_experiment.py)
"""
