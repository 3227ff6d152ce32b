"""``accuracy.png``: per method, the accuracy matrix (top) and each task's accuracy over time."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_accuracy(matrices: dict[str, np.ndarray], task_names: list[str], path: Path) -> None:
  """``matrices``: {method: (T, T) accuracies in percent, NaN where not evaluated}."""
  n, t = len(matrices), len(task_names)
  fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 6.4), squeeze=False)
  for col, (name, r) in enumerate(matrices.items()):
    r = np.asarray(r, np.float64)
    top, bottom = axes[0, col], axes[1, col]
    top.imshow(np.ma.masked_invalid(r), vmin=0, vmax=100, cmap="viridis")
    for (i, j), v in np.ndenumerate(r):
      if not np.isnan(v):
        top.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w")
    top.set_title(name, fontsize=9)
    top.set_xticks(range(t), [str(j) for j in range(t)], fontsize=7)
    top.set_yticks(range(t), [str(i) for i in range(t)], fontsize=7)
    top.set_xlabel("task j", fontsize=8)
    top.set_ylabel("after task i", fontsize=8)
    for j in range(t):
      rows = np.flatnonzero(~np.isnan(r[:, j]))
      bottom.plot(rows, r[rows, j], marker="o", markersize=3, label=task_names[j])
    bottom.set_xlim(-0.3, t - 0.7)
    bottom.set_ylim(0, 100)
    bottom.set_xlabel("after task i", fontsize=8)
    bottom.set_ylabel("accuracy (%)", fontsize=8)
    bottom.tick_params(labelsize=7)
  axes[1, 0].legend(fontsize=6, loc="lower left")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
