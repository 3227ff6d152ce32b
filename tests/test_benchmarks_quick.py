"""Every benchmark's ``--quick`` smoke run exits 0, prints its markdown table and leaves
benchmarks/RESULTS.md alone: benchmarks that stop working fail CI instead of rotting.

``SLOW`` ones (about a CPU-minute each: the φ ablation, absorption order, the EfficientNet feature
probe) run under ``pytest -m slow``; ``lots_of_loras --quick`` runs in
tests/test_lots_of_loras.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"

QUICK = {
  "merge": ["--quick", "--profile"],
  "serving": ["--quick"],
  "storage": ["--quick"],
  "continual": ["--config", "configs/text_domains.py", "--quick"],
  "fidelity": ["--quick"],
  "figure1": ["--quick"],
  "train_step": ["--quick"],
}


SLOW = {
  "ablation": ["--quick", "--workdir", "{tmp}"],
  "absorb_order": ["--quick", "--workdir", "{tmp}"],
  "efficientnet_probe": ["--quick"],
}

CASES = [pytest.param(n, QUICK[n], id=n) for n in sorted(QUICK)] + [
  pytest.param(n, SLOW[n], id=n, marks=pytest.mark.slow) for n in sorted(SLOW)
]


@pytest.mark.parametrize("name, args", CASES)
def test_quick_benchmark_runs_and_prints_its_table(name, args, tmp_path):
  before = RESULTS.read_bytes()
  env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
  proc = subprocess.run(
    [sys.executable, "-m", f"benchmarks.{name}", *(a.format(tmp=tmp_path) for a in args)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "|---|" in proc.stdout, proc.stdout[-2000:]
  assert RESULTS.read_bytes() == before
