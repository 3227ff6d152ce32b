"""The paper's Figure 1 observation on the text-domain sequence: LoRAs trained independently on
different tasks share a low-rank subspace.

Trains one LoRA per task (the runner's ``lora_per_task``, configs/text_domains.py: MiniLM q/v of
the top 3 layers, rank 8) for ``--seeds`` seeds, then measures with ``share_jax.diagnostics``:

- the explained-variance curve of the stacked task factors vs k, against random LoRAs of the
  same shapes (Gaussian factors: no shared structure);
- task × task similarity (linear CKA of ΔW, principal-angle cos² of factor spans);
- the novelty of each task's LoRA against a subspace built from the earlier tasks' LoRAs
  (``init_subspace``, 90 % explained variance).

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.figure1            # writes the RESULTS section
    python -m benchmarks.figure1 --quick                            # tiny BERT, synthetic tasks
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np

import share_jax as sj
from benchmarks.results_file import write_section
from share_jax import diagnostics as dg
from share_jax.experiments import run as runner
from share_jax.experiments.fitting import encode_task
from share_jax.experiments.methods import Context, LoRAPerTask

ROOT = Path(__file__).parent.parent
FIGURE = Path(__file__).with_name("figures") / "figure1_text_domains.png"
HEADING = "## Figure 1: task LoRAs share a low-rank subspace (issue 12)"


def text_config(quick: bool):
  spec = importlib.util.spec_from_file_location("text_domains", ROOT / "configs/text_domains.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.quick = quick
  return runner.resolve(config)


def train_loras(config, seeds: int) -> tuple[dict, list[str], object, str]:
  """({"task/seed": LoRA tree}, task names, backbone params, data note)."""
  raw, note = runner.load_tasks(config)
  backbone = runner.make_backbone(config)
  tasks = [encode_task(backbone, t) for t in raw]
  loras = {}
  for seed in range(seeds):
    method = LoRAPerTask(Context(backbone, config, seed))
    for i, task in enumerate(tasks):
      method.learn(i, task)
      loras[f"{task.name}/s{seed}"] = method.models[i][0]
  return loras, [t.name for t in tasks], backbone.params, note


def random_like(loras: dict, seed: int) -> dict:
  """Gaussian LoRAs with the shapes (and per-factor norms) of ``loras``: no shared structure."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, tree in loras.items():
    leaves = {}
    for path, x in sj.lora_leaves(tree).items():
      a, b = (rng.normal(size=np.shape(f)) for f in (x.a, x.b))
      a *= np.linalg.norm(x.a) / np.linalg.norm(a)
      b *= np.linalg.norm(np.asarray(x.b) * x.scale) / np.linalg.norm(b)
      leaves[path] = sj.LoRA(a.astype(np.float32), b.astype(np.float32))
    out[f"random {name}"] = sj.paths.nest(leaves)
  return out


def novelty_curve(params, loras: list) -> tuple[list[float], list[float]]:
  """Novelty of LoRA i against the subspace of LoRAs 0..i-1 (90 % explained variance): of its
  ΔW, and of its side-b factors (mean over kernels)."""
  total, side_b = [], []
  for i in range(1, len(loras)):
    sub = sj.init_subspace(params, loras[:i], explained_variance=0.9)
    nov = dg.novelty(sub, loras[i])
    total.append(nov.total)
    side_b.append(float(np.mean([v for (_, s), v in nov.sides.items() if s == "b"])))
  return total, side_b


def side_mean_curve(curves: dict, side: str, length: int) -> np.ndarray:
  rows = [
    np.pad(c, (0, max(length - len(c), 0)), constant_values=1.0)[:length]
    for (_, s), c in curves.items()
    if s == side
  ]
  return np.mean(rows, axis=0)


def plot(path: Path, trained: dict, random: dict, names, sim, nov_t, nov_r) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
  n = max(len(c) for c in trained.values())
  ks = np.arange(1, n + 1)
  for curves, label, style in ((trained, "trained", "-"), (random, "random", ":")):
    for side, color in (("a", "C0"), ("b", "C1")):
      axes[0].plot(
        ks,
        side_mean_curve(curves, side, n),
        style,
        color=color,
        label=f"{label} LoRAs, side {side}",
      )
  axes[0].set_xlabel("k")
  axes[0].set_ylabel("energy kept (mean over kernels)")
  axes[0].set_title("explained variance of the stacked task factors", fontsize=9)
  axes[0].legend(fontsize=7)
  axes[0].grid(alpha=0.3)
  im = axes[1].imshow(sim, vmin=0, vmax=1, cmap="viridis")
  t = len(names)
  axes[1].set_xticks(range(t), names, rotation=60, ha="right", fontsize=6)
  axes[1].set_yticks(range(t), names, fontsize=6)
  axes[1].set_title("linear CKA of ΔW between task LoRAs", fontsize=9)
  fig.colorbar(im, ax=axes[1], fraction=0.046)
  x = range(2, len(nov_t[0]) + 2)
  axes[2].plot(x, nov_t[0], "o-", color="C0", label="trained LoRAs, ΔW")
  axes[2].plot(x, nov_t[1], "s-", color="C1", label="trained LoRAs, side b")
  axes[2].plot(x, nov_r[0], "o:", color="C0", label="random LoRAs, ΔW")
  axes[2].plot(x, nov_r[1], "s:", color="C1", label="random LoRAs, side b")
  axes[2].set_xlabel("LoRA i (vs subspace of LoRAs 1..i-1)")
  axes[2].set_ylabel("novelty (energy outside the bases)")
  axes[2].set_ylim(0, 1.02)
  axes[2].legend(fontsize=7)
  axes[2].grid(alpha=0.3)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=72)
  plt.close(fig)


def offdiag(m: np.ndarray) -> np.ndarray:
  return m[~np.eye(len(m), dtype=bool)]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny BERT on synthetic tasks")
  parser.add_argument("--seeds", type=int, default=2, help="LoRAs per task (training seeds)")
  parser.add_argument("--no-write", action="store_true", help="print only")
  args = parser.parse_args(argv)
  start = time.time()
  config = text_config(args.quick)
  loras, tasks, params, note = train_loras(config, args.seeds)
  rand = random_like(loras, 0)
  names = list(loras)
  ev_t, ev_r = dg.explained_variance(loras), dg.explained_variance(rand)
  k90_t, k90_r = dg.k_for(ev_t, 0.9), dg.k_for(ev_r, 0.9)
  _, cka_t = dg.task_similarity(loras, "cka")
  _, cka_r = dg.task_similarity(rand, "cka")
  _, ang_t = dg.task_similarity(loras, "angles")
  _, ang_r = dg.task_similarity(rand, "angles")
  first_seed = [loras[f"{t}/s0"] for t in tasks]
  nov_t = novelty_curve(params, first_seed)
  nov_r = novelty_curve(params, [rand[f"random {t}/s0"] for t in tasks])
  figure = FIGURE if not args.quick else Path("/tmp/figure1_quick.png")
  plot(figure, ev_t, ev_r, names, cka_t, nov_t, nov_r)
  same_task = [
    cka_t[i, j]
    for i in range(len(names))
    for j in range(len(names))
    if i != j and names[i].split("/")[0] == names[j].split("/")[0]
  ]
  other_task = [
    cka_t[i, j]
    for i in range(len(names))
    for j in range(len(names))
    if names[i].split("/")[0] != names[j].split("/")[0]
  ]
  n_cols = len(next(iter(ev_t.values())))

  def k_line(ks, side):
    v = np.array([k for (_, s), k in ks.items() if s == side])
    return f"median {np.median(v):g} (range {v.min()}–{v.max()})"

  rows = [
    "| measure | trained task LoRAs | random LoRAs (same shapes) |",
    "|---|---|---|",
    f"| k for 90 % energy, side a (of {n_cols} columns) | {k_line(k90_t, 'a')} | "
    f"{k_line(k90_r, 'a')} |",
    f"| k for 90 % energy, side b | {k_line(k90_t, 'b')} | {k_line(k90_r, 'b')} |",
    f"| linear CKA of ΔW, mean off-diagonal | {offdiag(cka_t).mean():.3f} | "
    f"{offdiag(cka_r).mean():.3f} |",
    f"| … same task, other seed | {np.mean(same_task) if same_task else float('nan'):.3f} | – |",
    f"| … different tasks | {np.mean(other_task):.3f} | – |",
    f"| principal-angle cos² of spans, mean off-diagonal | {offdiag(ang_t).mean():.3f} | "
    f"{offdiag(ang_r).mean():.3f} |",
    f"| novelty of task i's ΔW vs subspace of tasks < i (90 % EV), i = 2..{len(tasks)} | "
    f"{', '.join(f'{v:.2f}' for v in nov_t[0])} | {', '.join(f'{v:.2f}' for v in nov_r[0])} |",
    f"| … of its side-b factors (mean over kernels) | "
    f"{', '.join(f'{v:.2f}' for v in nov_t[1])} | {', '.join(f'{v:.2f}' for v in nov_r[1])} |",
  ]
  text = "\n".join(
    [
      HEADING,
      "",
      f"`OPENBLAS_NUM_THREADS=1 python -m benchmarks.figure1{' --quick' if args.quick else ''}"
      f" --seeds {args.seeds}` — {time.strftime('%Y-%m-%d')}, {runner.machine()}, "
      f"{time.time() - start:.0f} s. {note}; {len(tasks)} tasks ({', '.join(tasks)}), one "
      f"rank-{config.lora.rank} LoRA per task and seed (the runner's `lora_per_task`, "
      "configs/text_domains.py), measured with `share_jax.diagnostics`. Random LoRAs: Gaussian "
      "factors with the same shapes and norms.",
      "",
      *rows,
      "",
      f"![Figure 1 on the text-domain sequence](figures/{FIGURE.name})",
      "",
    ]
  )
  print(text)
  if not args.no_write and not args.quick:
    write_section(HEADING, text)


if __name__ == "__main__":
  main()
