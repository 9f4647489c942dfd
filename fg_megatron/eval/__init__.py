"""Evaluation: scoring, negative flips, plots, the tiny flip experiment.

    score       sequence log-likelihood of rows under any layout (tools/score.py)
    flips       NFR / win / tie rates between pi0's and pi's responses (tools/eval_flips.py)
    plots       optional matplotlib PNGs: flip scatter, training curves
    experiment  DPO none / kd / flipguard on the tiny task, judged by its oracle
                (tools/run_flip_experiment.py)
"""
