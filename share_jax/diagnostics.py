"""What the stored tasks share, and how much a new adapter adds: the numbers behind choosing k and
behind the paper's Figure 1 (LoRAs of different tasks share a low-rank subspace).

A *source* is a ``Subspace`` (its stored tasks, as ``reconstruct`` gives them back) or LoRA trees
(a sequence, or a mapping task id → tree). Every kernel W (d_in, d_out) has two sides, as in the
subspace: ``a`` (columns a, in R^{d_in}) and ``b`` (columns of (b · scale)ᵀ, in R^{d_out}); a slot
is ``(kernel path, side)``. All numbers are float64, computed on the host from the factors (a
ΔW is never formed).

- ``explained_variance``: per slot, the fraction of the stacked tasks' (centred) factor energy
  that the top k singular directions hold, for k = 1, 2, …
- ``task_similarity``: a task × task matrix, mean over kernels of the linear CKA of the tasks'
  ΔW (rows = input features), or mean over slots of the squared cosines of the principal angles
  between the tasks' factor spans.
- ``novelty``: for a new adapter, the fraction of it the current bases do not hold (0: nothing
  new, 1: orthogonal to everything stored).

Plots (``write_report``) need matplotlib, imported only when called.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from share_jax._factors import factor_columns
from share_jax._validation import as_tasks
from share_jax.apply import reconstruct
from share_jax.errors import ShareError
from share_jax.lora import LoRA
from share_jax.subspace import SIDES, Subspace

Slot = tuple[str, str]
Source = Subspace | Sequence[Any] | Mapping[Hashable, Any]
MEASURES = ("cka", "angles")


def lora_columns(lora: LoRA) -> dict[str, np.ndarray]:
  """A LoRA's side columns in float64: ``a`` (d_in, r) and ``b`` = (b · scale)ᵀ (d_out, r)."""
  return factor_columns(lora, np.float64)


def task_factors(source: Source) -> tuple[list[Hashable], list[dict[str, dict[str, np.ndarray]]]]:
  """(task ids, per task ``{kernel path: {side: columns}}``) of a source."""
  if isinstance(source, Subspace):
    if not source.task_ids:
      raise ShareError("diagnostics need at least one task (the subspace holds none)")
    pairs = as_tasks([reconstruct(source, t) for t in source.task_ids], source.task_ids)
  else:
    pairs = as_tasks(source, None if isinstance(source, Mapping) else range(len(source)))
  ids = [t for t, _ in pairs]
  factors = [{p: lora_columns(x) for p, x in leaves.items()} for _, leaves in pairs]
  paths = set(factors[0])
  for t, f in zip(ids, factors, strict=True):
    if set(f) != paths:
      raise ShareError(
        f"task {t!r} adapts kernels {sorted(set(f) ^ paths)} that task {ids[0]!r} does not"
      )
  return ids, factors


def _centre_columns(x: np.ndarray) -> np.ndarray:
  return x - x.mean(axis=1, keepdims=True)


def explained_variance(source: Source, *, center: bool | None = None) -> dict[Slot, np.ndarray]:
  """Per slot, the cumulative energy fraction (n,) held by the top 1..n singular directions of
  all tasks' factor columns stacked side by side (mean column removed when ``center``; default:
  the subspace's setting, else True). Entry k-1 is what a basis of k columns keeps."""
  if center is None:
    center = source.config.center if isinstance(source, Subspace) else True
  _, factors = task_factors(source)
  curves = {}
  for path in sorted(factors[0]):
    for side in SIDES:
      stack = np.concatenate([f[path][side] for f in factors], axis=1)
      if center:
        stack = _centre_columns(stack)
      energy = np.linalg.svd(stack, compute_uv=False) ** 2
      total = energy.sum()
      curves[(path, side)] = np.cumsum(energy) / total if total > 0 else np.ones_like(energy)
  return curves


def k_for(curves: Mapping[Slot, np.ndarray], fraction: float) -> dict[Slot, int]:
  """Per slot, the smallest k whose curve reaches ``fraction`` (within 1e-12)."""
  return {s: int(np.searchsorted(c, fraction - 1e-12) + 1) for s, c in curves.items()}


def _linear_cka(fi: dict, fj: dict) -> float:
  """Linear CKA of ΔW_i = a_i b_iᵀ and ΔW_j (rows = d_in examples, centred), from r × r
  products only: ‖ΔW_jᵀ H ΔW_i‖² / (‖ΔW_iᵀ H ΔW_i‖ ‖ΔW_jᵀ H ΔW_j‖), H the centring matrix."""
  ai, aj = _centre_rows(fi["a"]), _centre_rows(fj["a"])
  gi, gj = fi["b"].T @ fi["b"], fj["b"].T @ fj["b"]

  def frob2(m, g_left, g_right):  # ‖B_l M B_rᵀ‖² with G = BᵀB
    return float(np.trace(m.T @ g_left @ m @ g_right))

  cross = frob2(aj.T @ ai, gj, gi)
  norm_i = np.sqrt(frob2(ai.T @ ai, gi, gi))
  norm_j = np.sqrt(frob2(aj.T @ aj, gj, gj))
  return 0.0 if norm_i * norm_j == 0 else cross / (norm_i * norm_j)


def _centre_rows(x: np.ndarray) -> np.ndarray:
  return x - x.mean(axis=0, keepdims=True)


def _span(x: np.ndarray) -> np.ndarray:
  """An orthonormal basis (d, rank) of the columns of x (numerical rank)."""
  u, s, _ = np.linalg.svd(x, full_matrices=False)
  tol = max(x.shape) * np.finfo(np.float64).eps * (s[0] if len(s) else 0.0)
  return u[:, s > tol]


def _angle_similarity(qi: np.ndarray, qj: np.ndarray) -> float:
  """Mean squared cosine of the principal angles between two spans: ‖Q_iᵀ Q_j‖² / min rank."""
  r = min(qi.shape[1], qj.shape[1])
  return 0.0 if r == 0 else float(np.sum((qi.T @ qj) ** 2) / r)


def task_similarity(source: Source, measure: str = "cka") -> tuple[list[Hashable], np.ndarray]:
  """(task ids, (T, T) similarity): ``"cka"``, the linear CKA of ΔW averaged over kernels, or
  ``"angles"``, the mean squared principal-angle cosine of factor spans averaged over slots.
  Both are 1 on the diagonal (for nonzero adapters), symmetric, in [0, 1]."""
  if measure not in MEASURES:
    raise ShareError(f"unknown similarity measure {measure!r}; known: {list(MEASURES)}")
  ids, factors = task_factors(source)
  paths = sorted(factors[0])
  t = len(ids)
  out = np.zeros((t, t))
  spans = (
    [{(p, s): _span(f[p][s]) for p in paths for s in SIDES} for f in factors]
    if measure == "angles"
    else None
  )
  for i in range(t):
    for j in range(i, t):
      if measure == "cka":
        vals = [_linear_cka(factors[i][p], factors[j][p]) for p in paths]
      else:
        vals = [_angle_similarity(spans[i][s], spans[j][s]) for s in spans[i]]
      out[i, j] = out[j, i] = float(np.mean(vals))
  return ids, out


@dataclasses.dataclass(frozen=True)
class Novelty:
  """How much of a new adapter the current bases miss (fractions of energy, in [0, 1]).

  ``sides[(path, side)]``: ‖(I − U Uᵀ) X‖² / ‖X‖² of its factor columns X; ``kernels[path]``:
  ‖ΔW − P_a ΔW P_b‖² / ‖ΔW‖², what projecting it now would lose; ``total``: the same over all
  kernels together (each weighted by its ‖ΔW‖²).
  """

  sides: dict[Slot, float]
  kernels: dict[str, float]
  total: float


def novelty(subspace: Subspace, lora_tree: Any) -> Novelty:
  """The ``Novelty`` of ``lora_tree`` (one adapter over the subspace's kernels) before absorbing
  it; uses only the bases, so it is cheap enough to run on every arrival."""
  ((_, leaves),) = as_tasks([lora_tree], ["<new>"])
  wanted = set(subspace.layout.paths)
  if set(leaves) != wanted:
    raise ShareError(
      f"the adapter's kernels differ from the subspace's: missing {sorted(wanted - set(leaves))}, "
      f"extra {sorted(set(leaves) - wanted)}"
    )
  bases = {g: np.asarray(b, np.float64) for g, b in subspace.bases.items()}
  sides, kernels, lost, energy = {}, {}, 0.0, 0.0
  for path in subspace.layout.paths:
    cols = lora_columns(leaves[path])
    proj = {}
    for side in SIDES:
      g, row = subspace.layout.slots[(path, side)]
      u, x = bases[g][row], cols[side]
      if u.shape[0] != x.shape[0]:
        raise ShareError(
          f"{path} [{side}]: the adapter has dimension {x.shape[0]}, not {u.shape[0]}"
        )
      proj[side] = u.T @ x
      norm = float(np.sum(x * x))
      sides[(path, side)] = (
        0.0 if norm == 0 else max(0.0, 1.0 - float(np.sum(proj[side] ** 2)) / norm)
      )
    full = float(np.trace((cols["a"].T @ cols["a"]) @ (cols["b"].T @ cols["b"])))
    kept = float(np.trace((proj["a"].T @ proj["a"]) @ (proj["b"].T @ proj["b"])))
    kernels[path] = 0.0 if full == 0 else max(0.0, 1.0 - kept / full)
    lost += max(0.0, full - kept)
    energy += full
  return Novelty(sides, kernels, 0.0 if energy == 0 else lost / energy)


# ----------------------------------------------------------------------------- report and plots


def _slot_name(slot: Slot) -> str:
  return f"{slot[0]} [{slot[1]}]"


def report(
  source: Source,
  fractions: Sequence[float] = (0.5, 0.9, 0.99),
  labels: Sequence[str] | None = None,
) -> dict:
  """JSON-ready numbers: tasks (``labels``, default the task ids as text), per-slot curves and
  the k each energy fraction needs, and both similarity matrices with their mean off-diagonal
  value."""
  curves = explained_variance(source)
  out: dict = {
    "curves": {_slot_name(s): [round(float(v), 6) for v in c] for s, c in curves.items()}
  }
  out["k_for"] = {
    str(f): {_slot_name(s): k for s, k in k_for(curves, f).items()} for f in fractions
  }
  for measure in MEASURES:
    ids, sim = task_similarity(source, measure)
    off = sim[~np.eye(len(ids), dtype=bool)]
    if labels is not None and len(labels) != len(ids):
      raise ShareError(f"{len(labels)} labels for {len(ids)} tasks")
    out["tasks"] = [str(t) for t in (ids if labels is None else labels)]
    out[f"similarity_{measure}"] = np.round(sim, 6).tolist()
    out[f"mean_offdiagonal_{measure}"] = float(off.mean()) if off.size else None
  return out


def _pyplot():
  try:
    import matplotlib
  except ModuleNotFoundError:
    raise ShareError(
      "diagnostic plots need matplotlib: pip install matplotlib (the numbers need nothing)"
    ) from None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def plot_explained_variance(curves: Mapping[Slot, np.ndarray], path: str | Path) -> None:
  """One line per slot (side ``a`` solid, ``b`` dashed): energy kept vs k."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for slot, c in curves.items():
    ax.plot(np.arange(1, len(c) + 1), c, "-" if slot[1] == "a" else "--", lw=1, alpha=0.7)
  ax.set_xlabel("k (basis columns)")
  ax.set_ylabel("fraction of factor energy kept")
  ax.set_ylim(0, 1.02)
  ax.set_title(f"explained variance per kernel side ({len(curves)} sides)", fontsize=9)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_similarity(ids: Sequence[Hashable], sim: np.ndarray, path: str | Path, title: str) -> None:
  """A task × task heatmap with its values."""
  plt = _pyplot()
  t = len(ids)
  fig, ax = plt.subplots(figsize=(1.2 + 0.6 * t, 1.0 + 0.55 * t))
  im = ax.imshow(sim, vmin=0, vmax=1, cmap="viridis")
  for (i, j), v in np.ndenumerate(sim):
    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
  ax.set_xticks(range(t), [str(x) for x in ids], rotation=45, ha="right", fontsize=7)
  ax.set_yticks(range(t), [str(x) for x in ids], fontsize=7)
  ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_report(
  source: Source, directory: str | Path, labels: Sequence[str] | None = None
) -> dict:
  """``report(source)`` as ``diagnostics.json`` plus ``explained_variance.png``,
  ``similarity_cka.png`` and ``similarity_angles.png`` in ``directory``; returns the numbers."""
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  numbers = report(source, labels=labels)
  plot_explained_variance(explained_variance(source), directory / "explained_variance.png")
  ids = numbers["tasks"]
  for measure, title in (("cka", "linear CKA of ΔW"), ("angles", "principal-angle cos² of spans")):
    plot_similarity(
      ids,
      np.asarray(numbers[f"similarity_{measure}"]),
      directory / f"similarity_{measure}.png",
      f"task similarity: {title}",
    )
  (directory / "diagnostics.json").write_text(json.dumps(numbers, indent=1))
  return numbers
