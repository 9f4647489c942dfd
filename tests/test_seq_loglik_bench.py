"""tools/bench_seq_loglik.py runs end to end and its memory measurement sees the
difference between materialising the logits and not (small size: ~10 s)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke(tmp_path):
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, "tools/bench_seq_loglik.py", "--tokens", "1024", "--hidden", "64",
                           "--vocab", "8000", "--impls", "naive,torch", "--rounds", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    naive, ours = rep["results"]["naive"], rep["results"]["torch"]
    # naive holds several [1024, 8000] fp32 tensors (31 MiB each) at its peak
    assert naive["peak_bytes"] >= 2 * 1024 * 8000 * 4
    # ours: the gradients (2 MiB) plus one 16 MiB logits tile and small change
    assert ours["peak_bytes"] <= 24 * 2**20 and ours["memory_ratio_vs_naive"] < 0.5
    assert ours["memory_ratio_vs_naive"] == ours["peak_bytes"] / naive["peak_bytes"]
    assert ours["seconds"] > 0 and ours["time_ratio_vs_naive"] == ours["seconds"] / naive["seconds"]
    assert "naive" in proc.stdout and "torch" in proc.stdout
