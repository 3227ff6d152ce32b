"""Two CPU processes joined by ``jax.distributed`` (coordinator on 127.0.0.1, gloo collectives)
run a layer-sharded merge and data-parallel steps; the results equal one process's."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import sharded_run

WORKER = Path(__file__).with_name("sharded_run.py")
PROCESSES, TIMEOUT_S = 2, 240


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
  out, port = tmp_path / "results.npz", free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
  logs = [tmp_path / f"worker{i}.log" for i in range(PROCESSES)]
  procs = []
  deadline = time.monotonic() + TIMEOUT_S
  try:
    for i, log in enumerate(logs):
      cmd = [sys.executable, str(WORKER), str(port), str(i), str(PROCESSES), str(out)]
      with log.open("w") as f:
        procs.append(subprocess.Popen(cmd, env=env, cwd=WORKER.parent, stdout=f, stderr=f))
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 1))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  report = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
  assert [p.returncode for p in procs] == [0] * PROCESSES, report
  got, want = dict(np.load(out)), sharded_run.reference()
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
