"""Benchmarks and the one-shot GPU check (``tools/gpu_check.sh``): a random model of a
given shape, synthetic preference data, an in-process DPO run and the check's report."""
