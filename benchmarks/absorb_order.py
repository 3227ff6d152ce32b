"""Does the order of absorption matter? The explained-variance rule on a zoo of real adapters,
absorbed in batches of 50, all at once and one at a time, under both readings of the threshold:
of the stack each merge sees (the paper) and of every column as it was absorbed
(``explained_of="absorbed"``). Per setting: retention, gain kept, agreement and ΔW error (as in
``benchmarks.lots_of_loras``), storage ratio, k range, and ``sj.explained`` (the variance of all
absorbed columns that the bases still hold, min and mean over kernel sides).

  python -m benchmarks.absorb_order --workdir runs/order_fashion --kind fashion \\
      --zoo-dir runs/zoo_fashion                      # a trained zoo (trained here if absent)
  python -m benchmarks.absorb_order --workdir /tmp/order --quick   # tiny zoo (smoke test)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np

import share_jax as sj
from benchmarks.lots_of_loras import (
  ABSORBED,
  FLOAT_BYTES,
  Scorer,
  _timed,
  lora_params,
  share_async,
  share_outcome,
)
from share_jax.experiments import zoo_train


def run(args) -> dict:
  s = (
    zoo_train.Settings.quick(args.kind, tiny=True)
    if args.quick
    else zoo_train.Settings.full(args.kind)
  )
  workdir = Path(args.workdir)
  lz = zoo_train.train_zoo(s, Path(args.zoo_dir) if args.zoo_dir else workdir / "zoo")
  names, originals, heads = zoo_train.read_zoo(lz)
  scorer = Scorer(lz, names, originals, heads)
  original_bytes = sum(lora_params(originals[n]) for n in names) * FLOAT_BYTES
  batch = 8 if args.quick else 50
  rows = {}
  for of in ("stack", "absorbed"):
    spec = {"explained_variance": args.ev, **(ABSORBED if of == "absorbed" else {})}
    runs = {
      f"batches of {batch}": lambda spec=spec: share_async(
        lz.backbone.params, names, originals, spec, batch
      ),
      "all at once": lambda spec=spec: _timed(
        lambda: jax.block_until_ready(sj.init_subspace(lz.backbone.params, originals, **spec))
      ),
      "one at a time": lambda spec=spec: share_async(lz.backbone.params, names, originals, spec, 1),
    }
    for how, go in runs.items():
      sub, seconds = go()
      label = f"{of}, {how}"
      o = share_outcome(label, label, sub, names, float(np.sum(seconds)), spec)
      m = scorer.summary(o, original_bytes)
      m.pop("per_task")
      rows[label] = m
      print(f"{label}: {json.dumps({k: m[k] for k in ('mean_retention', 'config')})}", flush=True)
  return {"num_tasks": len(names), "ev": args.ev, "kind": args.kind, "rows": rows}


def table(results: dict) -> str:
  lines = [
    f"explained_variance={results['ev']}, {results['num_tasks']} {results['kind']} adapters",
    "",
    "| reading, order | mean retention | min retention | gain kept | agreement | ΔW error "
    "| storage ratio | k range | explained (min / mean) |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for label, m in results["rows"].items():
    c = m["config"]
    gain = "—" if m["gain_retained"] is None else f"{100 * m['gain_retained']:.0f} %"
    lines.append(
      f"| {label} | {m['mean_retention']:.4f} | {m['min_retention']:.3f} | {gain} | "
      f"{m['mean_agreement']:.3f} | {m['mean_delta_error']:.3f} | {m['storage_ratio']:.1f}× | "
      f"{c['k_range'][0]}…{c['k_range'][1]} | {c['explained'][0]:.3f} / {c['explained'][1]:.3f} |"
    )
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--zoo-dir", default=None, help="a trained zoo to reuse (default DIR/zoo)")
  p.add_argument("--kind", default="text", choices=("text", "fashion"))
  p.add_argument("--ev", type=float, default=0.6, help="the explained-variance threshold")
  p.add_argument("--quick", action="store_true", help="a tiny zoo (smoke test)")
  args = p.parse_args(argv)
  results = run(args)
  Path(args.workdir).mkdir(parents=True, exist_ok=True)
  (Path(args.workdir) / "order.json").write_text(json.dumps(results, indent=1))
  print(table(results))


if __name__ == "__main__":
  main()
