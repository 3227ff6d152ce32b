"""Continual learning over seeds: every method of a config, mean ± std, appended to RESULTS.md.

    python -m benchmarks.continual --config configs/text_domains.py --workdir runs/bench \
      --seeds=0,1,2
    python -m benchmarks.continual --config configs/text_domains.py --quick  # smoke test

``--quick``: the config's quick mode (tiny backbone, few examples) on two tasks, the first seed
only, a temporary workdir unless one is given; the table is printed, RESULTS.md left alone.

Each seed is one ``share_jax.run`` run (``WORKDIR/seed_S/results.json``); the section
``## Continual learning (issue 3)`` of ``benchmarks/RESULTS.md`` gets a table of ACC,
forgetting, BWT, adapter parameters per task (trained / stored) and bytes per task.
"""

from __future__ import annotations

import datetime
import sys
import tempfile
from pathlib import Path

import numpy as np
from absl import app, flags

from benchmarks.results_file import mean_std
from share_jax.experiments import run as runner

_CONFIG, _WORKDIR = runner.define_flags(flags.FLAGS)
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds to run.")
_RESULTS = flags.DEFINE_string(
  "results", str(Path(__file__).parent / "RESULTS.md"), "Markdown file to append to."
)
_QUICK = flags.DEFINE_bool("quick", False, "Smoke test: quick config, 2 tasks, 1 seed, no write.")
SECTION = "## Continual learning (issue 3)"


def section(runs: list[dict], command: str) -> str:
  """Markdown: the command, machine, date, and one row per method (mean ± std over seeds)."""
  first = runs[0]
  lines = [
    SECTION,
    "",
    f"- command: `{command}`",
    f"- machine: {first['machine']}; date: {first['date']}",
    f"- data: {first['data']}; tasks: {', '.join(first['tasks'])}; backbone: {first['backbone']}",
    f"- seeds: {len(runs)}; accuracies in percent; FWT reference: {first['fwt_reference']}",
    "",
    "| method | strict | ACC | forgetting | BWT | adapter params/task trained | stored "
    "| bytes/task | wall s | CPU s |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, r in first["methods"].items():
    rows = [run["methods"][name] for run in runs]
    trained = [np.mean(r["params"]["adapter_trained_per_task"]) for r in rows]
    stored = [np.mean(r["params"]["adapter_stored_per_task"]) for r in rows]
    lines.append(
      f"| {name} | {'yes' if r['strict'] else 'no'} | {mean_std([r['ACC'] for r in rows])} "
      f"| {mean_std([r['forgetting'] for r in rows])} | {mean_std([r['BWT'] for r in rows])} "
      f"| {np.mean(trained):,.0f} | {np.mean(stored):,.0f} "
      f"| {np.mean([r['bytes_per_task'] for r in rows]):,.0f} "
      f"| {mean_std([r['wall_s'] for r in rows], '.0f')} "
      f"| {mean_std([r['cpu_s'] for r in rows], '.0f')} |"
    )
  return "\n".join(lines) + "\n"


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  config, workdir, seeds = _CONFIG.value, _WORKDIR.value, _SEEDS.value
  if _QUICK.value:
    config.quick, config.quick_overrides.data.num_tasks, seeds = True, 2, seeds[:1]
  elif workdir is None:
    raise app.UsageError("--workdir is required (unless --quick)")
  runner.keep_freed_memory()
  with tempfile.TemporaryDirectory() as tmp:
    runs = []
    for seed in map(int, seeds):
      config.seed = seed
      runs.append(runner.run(config, Path(workdir or tmp) / f"seed_{seed}"))
  text = section(runs, " ".join(["python -m benchmarks.continual", *sys.argv[1:]]))
  print(text)
  if not _QUICK.value:
    with open(_RESULTS.value, "a") as f:
      f.write(f"\n{text}")
    print(f"appended to {_RESULTS.value}")
  print(f"finished {datetime.datetime.now():%Y-%m-%d %H:%M}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
