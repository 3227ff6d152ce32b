"""LoRA factors as side columns, stacked per group: the input of every merge and projection."""

from __future__ import annotations

import numpy as np

from share_jax._profiling import phase
from share_jax.lora import LoRA
from share_jax.subspace import Layout


def factor_columns(lora: LoRA, dtype: type = np.float32) -> dict[str, np.ndarray]:
  """Side ``a``: a (d_in, r); side ``b``: (b · scale)ᵀ (d_out, r), as ``dtype`` host arrays."""
  a = np.asarray(lora.a, dtype)
  b = np.asarray(lora.b, dtype) * dtype(lora.scale)
  return {"a": a, "b": b.T}


@phase("stack")
def stack_factors(layout: Layout, tasks: list[dict], m_cap: int, p: int) -> dict[str, tuple]:
  """``{group: (x (m_cap, L, d, p), ncols (m_cap, L))}`` from the tasks' LoRA leaves."""
  out = {
    g: (np.zeros((m_cap, n, d, p), np.float32), np.zeros((m_cap, n), np.int32))
    for g, (d, n) in layout.groups.items()
  }
  for i, leaves in enumerate(tasks):
    for path, lora in leaves.items():
      for side, cols in factor_columns(lora).items():
        g, row = layout.slots[(path, side)]
        out[g][0][i, row, :, : cols.shape[1]] = cols
        out[g][1][i, row] = cols.shape[1]
  return out
