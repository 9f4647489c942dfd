"""Run a test script under torchrun (gloo on CPU) and read back its JSON result."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIST_DIR = Path(__file__).resolve().parent / "dist"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str | Path, nproc: int, *args: str, env: dict | None = None,
             timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nproc script args`` from the repo root."""
    script = Path(script)
    if not script.is_absolute():
        script = DIST_DIR / script
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(_free_port()), str(script), *map(str, args)]
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), full_env.get("PYTHONPATH", "")])
    if env:
        full_env.update(env)
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"torchrun {script.name} {' '.join(map(str, args))} failed (rc={proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


def torchrun_json(script: str | Path, nproc: int, *args: str, out: Path, **kwargs) -> dict:
    """Run a script that writes its result as JSON to ``--out``; return it."""
    torchrun(script, nproc, *args, "--out", str(out), **kwargs)
    return json.loads(Path(out).read_text())


def read_metrics(save: Path) -> list[dict]:
    """A training run's ``metrics.jsonl``, one dict per step."""
    return [json.loads(line) for line in (Path(save) / "metrics.jsonl").read_text().splitlines()]


def cli_error(script: Path, *args: str) -> str:
    """Run an entry point in one process that must fail with a user error (exit 2); its last line."""
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def tool_error(script: Path, *args: str) -> str:
    """Run an entry point in one process that must fail with a user error: exit status 2, exactly
    one ``error:`` line on stderr and no traceback.  Returns that line."""
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: "), proc.stderr[-3000:]
    return errors[0]


def torchrun_nodes(script: str | Path, nnodes: int, nproc_per_node: int, *args: str, timeout: float = 600,
                   env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """``nnodes`` torchrun agents ("nodes") of ``nproc_per_node`` processes each on this host, meeting
    through a c10d rendezvous on 127.0.0.1 as agents on separate machines would (README
    "Several machines").  Every agent must exit 0."""
    script = Path(script)
    if not script.is_absolute():
        script = DIST_DIR / script
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
           "--nproc-per-node", str(nproc_per_node), "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", f"fg-test-{os.getpid()}",
           str(script), *map(str, args)]
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), full_env.get("PYTHONPATH", "")])
    if env:
        full_env.update(env)
    agents = [subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for _ in range(nnodes)]
    procs = []
    try:
        for agent in agents:
            out, err = agent.communicate(timeout=timeout)
            procs.append(subprocess.CompletedProcess(cmd, agent.returncode, out, err))
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    for node, proc in enumerate(procs):
        if proc.returncode != 0:
            raise AssertionError(f"agent {node} of {nnodes} failed (rc={proc.returncode}):\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return procs
