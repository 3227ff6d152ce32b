"""Float64 NumPy references for the Share numerics, and random LoRAs with planted structure."""

from __future__ import annotations

import numpy as np

import share_jax as sj


def basis_ref(x: np.ndarray, *, center: bool, k: int | None = None, ev: float = 1.0):
  """The bases of the stack x (d, n): (U_k, k, energy of each candidate column).

  Uncentred: the top singular vectors of x. Centred: the mean direction m first, then the top
  singular vectors of the centred stack with m projected out; energies are centred variance.
  """
  x = np.asarray(x, np.float64)
  if center:
    mu = x.mean(axis=1)
    xc = x - mu[:, None]
    m = mu / np.linalg.norm(mu)
    u, s, _ = np.linalg.svd(xc - np.outer(m, m @ xc), full_matrices=False)
    u, lam = (
      np.concatenate([m[:, None], u], axis=1),
      np.concatenate([[np.sum((m @ xc) ** 2)], s**2]),
    )
  else:
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    lam = s**2
  if k is None:
    cum = np.cumsum(lam)
    k = int(np.searchsorted(cum, ev * cum[-1] * (1 - 1e-9)) + 1)
  k = min(k, u.shape[1])
  return u[:, :k], k, lam


def delta_error(rec: dict, orig: dict) -> float:
  """Relative Frobenius error of ΔW over all kernels: {path: LoRA} reconstructed vs original."""
  num = den = 0.0
  for path, lora in orig.items():
    want = np.asarray(lora.a, np.float64) @ np.asarray(lora.b, np.float64) * lora.scale
    got = np.asarray(rec[path].a, np.float64) @ np.asarray(rec[path].b, np.float64)
    num += float(np.sum((got * rec[path].scale - want) ** 2))
    den += float(np.sum(want**2))
  return float(np.sqrt(num / den)) if den > 0 else 0.0


def projector_distance(u: np.ndarray, v: np.ndarray) -> float:
  """Spectral norm of U Uᵀ − V Vᵀ for orthonormal column blocks (0 = same subspace)."""
  u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
  return float(np.linalg.norm(u @ u.T - v @ v.T, 2))


def rel_err(x, y) -> float:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))


def active_basis(sub: sj.Subspace, path: str, side: str) -> np.ndarray:
  g, row = sub.layout.slots[(path, side)]
  grp = sub.groups[g]
  return np.asarray(grp.basis[row, :, : int(grp.rank[row])], np.float64)


def side_columns(lora: sj.LoRA, side: str) -> np.ndarray:
  """The factor columns of one side, float64: a (d_in, r) or (b·scale)ᵀ (d_out, r)."""
  if side == "a":
    return np.asarray(lora.a, np.float64)
  return (np.asarray(lora.b, np.float64) * lora.scale).T


def task_columns(sub: sj.Subspace, task, path: str, side: str) -> np.ndarray:
  """A stored task's reconstructed factor columns, float64 (d, ncols)."""
  lora = sj.lora_leaves(sj.reconstruct(sub, task))[path]
  return side_columns(lora, side)


class Planted:
  """Random LoRAs on a toy param tree whose factors share a hidden low-dim subspace."""

  def __init__(self, seed: int, shapes=None, hidden: int = 4, noise: float = 0.05):
    self.rng = np.random.default_rng(seed)
    self.shapes = shapes or {
      "enc/l0/query/kernel": (24, 16),
      "enc/l0/value/kernel": (24, 24),
      "enc/l1/query/kernel": (24, 16),
    }
    self.noise = noise
    self.params = {"enc": {"embed": np.zeros((7, 24), np.float32)}}
    self.hidden = {}
    for path, (d_in, d_out) in self.shapes.items():
      node = self.params
      *parents, last = path.split("/")
      for key in parents:
        node = node.setdefault(key, {})
      node[last] = np.zeros((d_in, d_out), np.float32)
      self.hidden[path] = (self._ortho(d_in, hidden), self._ortho(d_out, hidden))
    self.scales = np.geomspace(4.0, 0.5, hidden)

  def _ortho(self, d, k):
    q, _ = np.linalg.qr(self.rng.normal(size=(d, k)))
    return q

  def lora_tree(self, rank: int, alpha: float | None = None, dtype=np.float32) -> dict:
    leaves = {}
    for path, (ua, ub) in self.hidden.items():
      h = ua.shape[1]
      a = ua @ (self.scales[:, None] * self.rng.normal(size=(h, rank)))
      b = ub @ (self.scales[:, None] * self.rng.normal(size=(h, rank)))
      a += self.noise * self.rng.normal(size=a.shape)
      b += self.noise * self.rng.normal(size=b.shape)
      leaves[path] = sj.LoRA(a.astype(dtype), b.T.astype(dtype), alpha)
    from share_jax.paths import nest

    return nest(leaves)

  def loras(self, n: int, rank: int = 3, **kw) -> list[dict]:
    return [self.lora_tree(rank, **kw) for _ in range(n)]
