"""Share's trained-parameter ablation on the text-domain sequence (issue 9): φ × p, then k.

    python -m benchmarks.ablation --workdir runs/ablation                     # φ × p grid, 3 seeds
    python -m benchmarks.ablation --workdir runs/abl --grid decision          # φ 0 vs 2 only
    python -m benchmarks.ablation --workdir /tmp/abl --quick                   # smoke test

Strict Share only, ``configs/text_domains.py``. ``--grid full``: φ (the temporary factors
trained next to the coefficients) ∈ {0, 1, 2, 4} × p (the pseudo-rank) ∈ {1, 2, 4}, then the
subspace size at the default φ, p: ``explained_variance`` ∈ {0.8, 0.97} and k = 4;
``--grid decision``: φ ∈ {0, 2} at p = 1. A φ = 0 task only re-weights the current basis, so an
empty subspace would never grow: φ = 0 cells start from a first-task LoRA
(``cold_start="lora"``), every other cell from data (the runner's default). Per seed the backbone
and encoded tasks are built once, a head-only row is added, and every cell reuses the compiled
steps.

``--budget full`` (default) keeps the config as is (top 3 layers, 100 per class): ~180 CPU-s per
cell, so the full grid is ~2¼ CPU-hours on 2 cores. ``--budget cpu`` adapts only the top MiniLM
layer (``frozen_layers=5``) with 60 training examples per class, ~3× cheaper, but there the
adapters add ~1 point over the heads, too little to rank the cells (``benchmarks/RESULTS.md``).

Writes ``WORKDIR/seed_S.json`` after every cell (a killed run resumes; processes running other
seeds may share the workdir), then, over all seed files, ``WORKDIR/ablation.json``,
``WORKDIR/ablation.md`` (mean ± sd over seeds per cell) and ``WORKDIR/ablation.png`` (final ACC
vs trained adapter parameters per task). ``--seeds ""`` only rebuilds those three.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import share_jax as sj  # noqa: E402
from benchmarks.results_file import mean_std  # noqa: E402
from configs import text_domains  # noqa: E402
from share_jax.experiments import report  # noqa: E402
from share_jax.experiments import run as runner  # noqa: E402
from share_jax.experiments.fitting import encode_task  # noqa: E402
from share_jax.experiments.methods import METHODS, Context  # noqa: E402

DEFAULT = {"phi": 2, "p": 1, "explained_variance": 0.9}


def cells(grid: str) -> list[dict]:
  """Every cell's ``config.share`` overrides: ``full`` (φ × p, then the subspace size at the
  default φ, p), ``decision`` (φ = 0 vs the default φ = 2, p = 1) or ``quick``."""
  if grid == "quick":
    return [{"phi": phi, "p": 1} for phi in (0, 2)] + [
      {"phi": 2, "p": 1, "explained_variance": 0.8}
    ]
  if grid == "decision":
    return [{"phi": phi, "p": 1} for phi in (0, 2)]
  cross = [{"phi": phi, "p": p} for phi in (0, 1, 2, 4) for p in (1, 2, 4)]
  size = [{"phi": 2, "p": 1, "explained_variance": ev} for ev in (0.8, 0.97)]
  return cross + size + [{"phi": 2, "p": 1, "k": 4}]


def parse_cells(text: str) -> list[dict]:
  """``"phi=4,p=1;k=4,phi=2,p=1"`` → cells (ints where the value is one)."""
  out = []
  for cell in filter(None, text.split(";")):
    pairs = (item.split("=") for item in cell.split(","))
    out.append({k.strip(): float(v) if "." in v else int(v) for k, v in pairs})
  return out


def label(cell: dict) -> str:
  return ", ".join(f"{'ev' if k == 'explained_variance' else k}={v}" for k, v in cell.items())


def share_overrides(cell: dict) -> dict:
  """``config.share`` fields of a cell: φ = 0 needs a basis from the first task's LoRA."""
  out = dict(cell)
  if "k" in cell:
    out["explained_variance"] = None
  out["cold_start"] = "lora" if cell["phi"] == 0 else "data"
  return out


def base_config(quick: bool, budget: str):
  config = text_domains.get_config()
  config.quick = quick
  if budget == "cpu" and not quick:
    config.backbone.frozen_layers = 5
    config.data.n_train_per_class = 60
  return config


def run_seed(config, seed: int, todo: list[dict], done: dict, save) -> int:
  """Runs the cells of ``todo`` not yet in ``done`` (by label) on one seed's tasks; returns the
  parameter count of one rank-r LoRA on the adapted kernels (the reference for "trained")."""
  config.seed = seed
  config = runner.resolve(config)
  raw, note = runner.load_tasks(config)
  backbone = runner.make_backbone(config)
  print(f"seed {seed}: {backbone.name}, {note}", flush=True)
  tasks = [encode_task(backbone, t) for t in raw]
  ctx = Context(backbone, config, seed)
  if "head_only" not in done:
    save("head_only", seed, measure(METHODS["head_only"](ctx), tasks, None), raw)
  for cell in todo:
    name = label(cell)
    if name in done:
      continue
    for key, value in share_overrides(cell).items():
      config.share[key] = value
    ctx.config = config  # the jitted steps stay cached on ctx across cells
    result = measure(METHODS["share"](ctx), tasks, None)
    save(name, seed, result, raw)
    print(f"seed {seed} {name}: ACC {result['ACC']} forgetting {result['forgetting']}", flush=True)
    for key, value in share_overrides(DEFAULT).items():
      config.share[key] = value
    config.share.k = None
  lora = sj.init_lora_tree(
    backbone.params, backbone.target, rank=config.lora.rank, rng=jax.random.key(0)
  )
  return int(sum(np.size(x) for x in jax.tree.leaves(lora)))


def measure(method, tasks, reference) -> dict:
  t0, c0 = time.time(), time.process_time()
  r = runner.accuracy_matrix(method, tasks)
  return report.method_result(method, r, time.time() - t0, time.process_time() - c0, reference)


def summarize(results: dict) -> list[dict]:
  """Per cell (the JSON's keys, head_only first): mean over seeds of every reported number."""
  rows = []
  for name, by_seed in results["cells"].items():
    runs = list(by_seed.values())
    trained = [r["params"]["adapter_trained_per_task"] for r in runs]
    stored = [r["params"]["adapter_stored_per_task"] for r in runs]
    rows.append(
      {
        "cell": name,
        "seeds": len(runs),
        "acc": [r["ACC"] for r in runs],
        "forgetting": [r["forgetting"] for r in runs],
        "trained": float(np.mean([np.mean(t) for t in trained])),
        "trained_later": float(np.mean([np.mean(t[1:]) for t in trained])),
        "stored": float(np.mean([np.mean(s) for s in stored])),
        "shared": float(np.mean([r["params"]["shared"] for r in runs])),
        "cpu_s": float(np.mean([r["cpu_s"] for r in runs])),
      }
    )
  return rows


def markdown(results: dict) -> str:
  rows = summarize(results)
  lines = [
    f"- command: `{results['command']}`",
    f"- date: {results['date']}; budget: {results['budget']}; config: {results['config']}",
    f"- tasks: {', '.join(results['tasks'])}; LoRA rank 8 for reference: "
    f"{results['lora_params']:,} adapter parameters per task",
    "",
    "| cell | seeds | ACC | forgetting | trained/task (tasks 2–T) | stored/task | shared basis "
    "| CPU s/run |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['cell']} | {r['seeds']} | {mean_std(r['acc'])} | {mean_std(r['forgetting'])} "
      f"| {r['trained']:,.0f} ({r['trained_later']:,.0f}) | {r['stored']:,.0f} "
      f"| {r['shared']:,.0f} | {r['cpu_s']:.0f} |"
    )
  return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
  rows = [r for r in summarize(results) if r["cell"] != "head_only"]
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for r in rows:
    phi = int(r["cell"].split(",")[0].split("=")[1])
    ax.errorbar(
      max(r["trained_later"], 1),
      np.mean(r["acc"]),
      yerr=np.std(r["acc"]),
      marker="os^D"[[0, 1, 2, 4].index(phi)],
      color=f"C{[0, 1, 2, 4].index(phi)}",
      capsize=2,
    )
    ax.annotate(r["cell"], (max(r["trained_later"], 1), np.mean(r["acc"])), fontsize=6)
  head = [r for r in summarize(results) if r["cell"] == "head_only"]
  if head:
    ax.axhline(np.mean(head[0]["acc"]), color="gray", ls="--", lw=1, label="head only")
  ax.axvline(results["lora_params"], color="k", ls=":", lw=1, label="one rank-8 LoRA")
  ax.set_xscale("log")
  ax.set_xlabel("trained adapter parameters per task (tasks 2–T, heads excluded)")
  ax.set_ylabel("final ACC (%)")
  ax.set_title("Share on the text-domain sequence: φ × p × subspace size", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--quick", action="store_true", help="tiny backbone, 3 cells, 1 seed")
  p.add_argument("--seeds", default="0,1,2", help='"" = only rebuild the table and plot')
  p.add_argument("--budget", choices=("cpu", "full"), default="full")
  p.add_argument("--grid", choices=("full", "decision"), default="full")
  p.add_argument(
    "--cells",
    default="",
    help='instead of --grid, e.g. "phi=4,p=1;phi=2,p=1,explained_variance=0.8"',
  )
  args = p.parse_args(argv)
  workdir = Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  seeds = [int(s) for s in args.seeds.split(",") if s][: 1 if args.quick else None]
  config = base_config(args.quick, args.budget)
  resolved = runner.resolve(config)
  command = " ".join(["python -m benchmarks.ablation", *(sys.argv[1:] if argv is None else argv)])
  for seed in seeds:  # one file per seed: processes running other seeds may share the workdir
    path = workdir / f"seed_{seed}.json"
    results = json.loads(path.read_text()) if path.is_file() else {"cells": {}}
    results.update(
      command=command,
      budget=args.budget,
      config={
        "backbone": dict(resolved.backbone),
        "data": dict(resolved.data),
        "epochs": config.train.epochs,
      },
    )

    def save(name: str, seed: int, result: dict, raw, results=results, path=path) -> None:
      results["cells"][name] = result
      results["tasks"] = [t.name for t in raw]
      results["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
      path.write_text(json.dumps(results, indent=1, default=list))

    results["lora_params"] = run_seed(
      config,
      seed,
      parse_cells(args.cells) if args.cells else cells("quick" if args.quick else args.grid),
      results["cells"],
      save,
    )
    path.write_text(json.dumps(results, indent=1, default=list))
  results = combine(sorted(workdir.glob("seed_*.json")))
  (workdir / "ablation.json").write_text(json.dumps(results, indent=1, default=list))
  text = markdown(results)
  (workdir / "ablation.md").write_text(text)
  plot(results, workdir / "ablation.png")
  print(text)
  print(f"wrote {workdir / 'ablation.json'}, {workdir / 'ablation.md'}, {workdir / 'ablation.png'}")


def combine(paths: list[Path]) -> dict:
  """The seeds' files as one: ``cells[name][seed]``; settings from the first file (files of
  seeds still running may lack ``lora_params``)."""
  runs = {p.stem.split("_")[1]: json.loads(p.read_text()) for p in paths}
  first = next(iter(runs.values()))
  out = {k: v for k, v in first.items() if k != "cells"}
  out["lora_params"] = max(r.get("lora_params", 0) for r in runs.values())  # 0: none finished
  out["cells"] = {}
  for seed, r in runs.items():
    for name, result in r["cells"].items():
      out["cells"].setdefault(name, {})[seed] = result
  return out


if __name__ == "__main__":
  main()
