"""Storage accounting: shared bases, per-task coefficients and heads, versus plain LoRA adapters."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable

import jax
import numpy as np

from share_jax.subspace import Subspace

FLOAT_BYTES = 4  # coefficients and bases are stored in float32


@dataclasses.dataclass(frozen=True)
class Storage:
  """Parameter counts (and float32 bytes) of a subspace and of the LoRA adapters it replaces.

  ``task_params[t]`` counts the coefficients task t actually uses (k_active × columns per side);
  ``lora_params[t]`` the same task as a LoRA ((d_in + d_out) × rank per kernel). Heads are counted
  on both sides. The paper's ratios (100×, 281×) compare coefficients with LoRAs and leave the
  bases out; ``ratio_with_bases`` puts them back in.
  """

  basis_params: int
  task_params: dict[Hashable, int]
  head_params: dict[Hashable, int]
  lora_params: dict[Hashable, int]

  @property
  def share_total(self) -> int:
    return self.basis_params + sum(self.task_params.values()) + sum(self.head_params.values())

  @property
  def lora_total(self) -> int:
    return sum(self.lora_params.values()) + sum(self.head_params.values())

  def bytes(self, n: int) -> int:
    return n * FLOAT_BYTES

  @property
  def ratio_per_task(self) -> float:
    """Mean LoRA parameters per task / mean coefficients per task (the paper's "100×")."""
    return sum(self.lora_params.values()) / max(sum(self.task_params.values()), 1)

  @property
  def ratio_with_bases(self) -> float:
    """All LoRAs (+ heads) / everything Share stores (bases + coefficients + heads)."""
    return self.lora_total / max(self.share_total, 1)

  def summary(self) -> dict[str, float]:
    n = max(len(self.task_params), 1)
    return {
      "tasks": len(self.task_params),
      "basis_params": self.basis_params,
      "coef_params_per_task": sum(self.task_params.values()) / n,
      "lora_params_per_task": sum(self.lora_params.values()) / n,
      "head_params_total": sum(self.head_params.values()),
      "share_bytes": self.bytes(self.share_total),
      "lora_bytes": self.bytes(self.lora_total),
      "ratio_per_task": self.ratio_per_task,
      "ratio_with_bases": self.ratio_with_bases,
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
  task, lora = {}, {}
  for i, t in enumerate(subspace.task_ids):
    task[t] = lora[t] = 0
    for g, row in layout.slots.values():
      rank, ncols = host[g]
      d, _ = layout.groups[g]
      task[t] += int(rank[row]) * int(ncols[i, row])
      lora[t] += d * (int(ncols[i, row]) if lora_rank is None else lora_rank)
  heads = {
    t: sum(int(np.size(x)) for x in jax.tree.leaves(subspace.heads.get(t, {})))
    for t in subspace.task_ids
  }
  return Storage(basis, task, heads, lora)
