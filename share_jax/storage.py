"""Storage accounting: shared bases, per-task coefficients and heads, versus plain LoRA adapters,
with what each task keeps of its ΔW."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable

import jax
import numpy as np

from share_jax.fidelity import task_errors
from share_jax.subspace import Subspace

FLOAT_BYTES = 4  # coefficients and bases are stored in float32


@dataclasses.dataclass(frozen=True)
class Storage:
  """Parameter counts (and float32 bytes) of a subspace and of the LoRA adapters it replaces.

  ``coef_params[t]`` counts the coefficients task t actually uses (k_active × columns per side);
  ``lora_params[t]`` the same task as a LoRA ((d_in + d_out) × rank per kernel). Heads are counted
  on both sides. The paper's ratios (100×, 281×) compare coefficients with LoRAs and leave the
  bases out; ``ratio_with_bases`` puts them back in. ``task_errors[t]``: the relative ΔW error
  bound of task t (``share_jax.task_errors``).
  """

  basis_params: int
  coef_params: dict[Hashable, int]
  head_params: dict[Hashable, int]
  lora_params: dict[Hashable, int]
  task_errors: dict[Hashable, float] = dataclasses.field(default_factory=dict)

  @property
  def share_total(self) -> int:
    return self.basis_params + sum(self.coef_params.values()) + sum(self.head_params.values())

  @property
  def lora_total(self) -> int:
    return sum(self.lora_params.values()) + sum(self.head_params.values())

  @property
  def share_bytes(self) -> int:
    return self.share_total * FLOAT_BYTES

  @property
  def lora_bytes(self) -> int:
    return self.lora_total * FLOAT_BYTES

  @property
  def ratio_per_task(self) -> float:
    """Mean LoRA parameters per task / mean coefficients per task (the paper's "100×")."""
    return sum(self.lora_params.values()) / max(sum(self.coef_params.values()), 1)

  @property
  def ratio_with_bases(self) -> float:
    """All LoRAs (+ heads) / everything Share stores (bases + coefficients + heads)."""
    return self.lora_total / max(self.share_total, 1)

  def summary(self) -> dict[str, float]:
    n = max(len(self.coef_params), 1)
    errors = list(self.task_errors.values())
    return {
      "tasks": len(self.coef_params),
      "basis_params": self.basis_params,
      "coef_params_per_task": sum(self.coef_params.values()) / n,
      "lora_params_per_task": sum(self.lora_params.values()) / n,
      "head_params_total": sum(self.head_params.values()),
      "share_bytes": self.share_bytes,
      "lora_bytes": self.lora_bytes,
      "ratio_per_task": self.ratio_per_task,
      "ratio_with_bases": self.ratio_with_bases,
      "worst_task_error": max(errors, default=0.0),
      "mean_task_error": float(np.mean(errors)) if errors else 0.0,
      "task_errors": {str(t): e for t, e in self.task_errors.items()},
    }


def storage(subspace: Subspace, *, lora_rank: int | None = None) -> Storage:
  """Count what ``subspace`` stores and what the equivalent LoRA adapters would: of rank
  ``lora_rank``, or by default of each task's own number of factor columns."""
  layout = subspace.layout
  host = {g: (np.asarray(grp.rank), np.asarray(grp.ncols)) for g, grp in subspace.groups.items()}
  basis = 0
  for g, row in layout.slots.values():
    d, _ = layout.groups[g]
    basis += d * int(host[g][0][row])
  coef, lora = {}, {}
  for i, t in enumerate(subspace.task_ids):
    coef[t] = lora[t] = 0
    for g, row in layout.slots.values():
      rank, ncols = host[g]
      d, _ = layout.groups[g]
      coef[t] += int(rank[row]) * int(ncols[i, row])
      lora[t] += d * (int(ncols[i, row]) if lora_rank is None else lora_rank)
  heads = {
    t: sum(int(np.size(x)) for x in jax.tree.leaves(subspace.heads.get(t, {})))
    for t in subspace.task_ids
  }
  return Storage(basis, coef, heads, lora, task_errors(subspace))
