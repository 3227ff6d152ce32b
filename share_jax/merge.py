"""The jitted per-group merge: new bases from old tasks plus new factor columns, in the small span.

Every column of the stack [β ε_1, …, β ε_T, X_new] lies in span([β, X_new]). One reduced QR
[β, X_new] = Q R gives coordinates: old tasks R_β ε_i, new columns Y = R_X. The centred Gram of
all coordinates, C = R_β G R_βᵀ + Y Yᵀ − s sᵀ / N with G = Σ_i ε_i ε_iᵀ and s the column sum, is
(K + M) × (K + M) whatever the number of tasks; its top eigenvectors V give the new basis Q V and
every task's new coefficients Vᵀ R_β ε_i. The d × (T r) stack and any d × d matrix are never formed.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from share_jax.subspace import FactorGroup

HIGHEST = jax.lax.Precision.HIGHEST
_EPS32 = float(jnp.finfo(jnp.float32).eps)


class Rule(NamedTuple):
  """Static k rule of a group: fixed ``k`` or ``explained_variance``, capped at ``limit``."""

  explained_variance: float
  k: int | None
  limit: int
  center: bool


def mm(spec: str, *args: jax.Array) -> jax.Array:
  """``jnp.einsum`` at full float32 precision (TPU/TF32 defaults would ruin Gram matrices)."""
  return jnp.einsum(spec, *args, precision=HIGHEST)


def choose_k(lam: jax.Array, rule: Rule) -> tuple[jax.Array, jax.Array]:
  """(k wanted by the rule, cumulative energies) for eigenvalues ``lam`` sorted descending.

  Eigenvalues below float32 round-off (10 n eps λ_max) count as zero, so that with
  ``explained_variance=1`` k is the numerical rank.
  """
  n = lam.shape[0]
  lam = jnp.maximum(lam, 0.0)
  lam = jnp.where(lam > 10 * n * _EPS32 * lam[0], lam, 0.0)
  cum = jnp.cumsum(lam)
  if rule.k is not None:
    want = jnp.asarray(min(rule.k, rule.limit), jnp.int32)
  else:
    below = jnp.sum(cum[:-1] < rule.explained_variance * cum[-1])
    want = jnp.minimum(1 + below, rule.limit).astype(jnp.int32)
  return want, cum


def svd_flip_columns(u: jax.Array) -> jax.Array:
  """±1 per column making each column's largest-magnitude entry positive (sklearn's svd_flip)."""
  idx = jnp.argmax(jnp.abs(u), axis=0)
  s = jnp.sign(u[idx, jnp.arange(u.shape[1])])
  return jnp.where(s == 0, 1.0, s)


def _merge_one(basis, coef, ncols, x, new_ncols, *, k_out: int, rule: Rule):
  """One (kernel, side) slot. basis (d, K), coef (T, K, P), x (m, d, P) → see ``merge_group``."""
  d, k_in = basis.shape
  m, _, p = x.shape
  cols = jnp.transpose(x, (1, 0, 2)).reshape(d, m * p)
  q, r = jnp.linalg.qr(jnp.concatenate([basis, cols], axis=1), mode="reduced")
  r_old, y = r[:, :k_in], r[:, k_in:]
  gram = mm("tkp,tjp->kj", coef, coef)
  c = mm("ik,jk->ij", mm("ik,kl->il", r_old, gram), r_old) + mm("ip,jp->ij", y, y)
  if rule.center:
    count = jnp.maximum(jnp.sum(ncols) + jnp.sum(new_ncols), 1).astype(jnp.float32)
    s = mm("ik,k->i", r_old, jnp.sum(coef, axis=(0, 2))) + jnp.sum(y, axis=1)
    c = c - jnp.outer(s, s) / count
  lam, v = jnp.linalg.eigh(0.5 * (c + c.T))
  lam, v = lam[::-1], v[:, ::-1]
  want, cum = choose_k(lam, rule)
  n = v.shape[1]
  k_sel = jnp.minimum(want, min(k_out, n))
  v = jnp.pad(v, ((0, 0), (0, max(k_out - n, 0))))[:, :k_out]
  v = v * (jnp.arange(k_out) < k_sel)
  u = mm("dn,nk->dk", q, v)
  flip = svd_flip_columns(u)
  u, v = u * flip, v * flip
  new_coef = mm("nk,nj,tjp->tkp", v, r_old, coef)
  x_coef = mm("nk,nq->kq", v, y).reshape(k_out, m, p).transpose(1, 0, 2)
  total = cum[-1]
  energy = jnp.where(total > 0, cum[k_sel - 1] / jnp.where(total > 0, total, 1.0), 1.0)
  return u, k_sel, new_coef, x_coef, energy, want


@functools.partial(jax.jit, static_argnames=("k_out", "rule"))
def merge_group(
  group: FactorGroup, x: jax.Array, x_ncols: jax.Array, start: jax.Array, *, k_out: int, rule: Rule
) -> tuple[FactorGroup, jax.Array]:
  """Fold new factor columns into a group and re-project every stored task.

  Args:
    group: bases (L, d, K), coefficients (T, L, K, P) of the tasks already held.
    x: new tasks' factor columns (m, L, d, P), zero-padded; ``x_ncols`` (m, L) their counts.
    start: task row where the m new tasks go (``start + m <= T``).
    k_out: basis capacity of the result; ``rule``: how many columns are active.

  Returns:
    The new group (capacity K = ``k_out``) and the k each slot's rule wanted (L,), so a caller can
    grow the capacity and merge again when it is too small.
  """
  x = x.astype(jnp.float32)
  merge = functools.partial(_merge_one, k_out=k_out, rule=rule)
  u, rank, coef, x_coef, energy, want = jax.vmap(
    merge, in_axes=(0, 1, 1, 1, 1), out_axes=(0, 0, 1, 1, 0, 0)
  )(group.basis, group.coef, group.ncols, x, x_ncols)
  coef = jax.lax.dynamic_update_slice_in_dim(coef, x_coef, start, axis=0)
  ncols = jax.lax.dynamic_update_slice_in_dim(group.ncols, x_ncols.astype(jnp.int32), start, axis=0)
  return FactorGroup(u, rank, coef, ncols, energy), want


@jax.jit
def project_group(basis: jax.Array, x: jax.Array) -> jax.Array:
  """Coefficients of factor columns in the current basis: (L, d, K), (L, d, P) → (L, K, P)."""
  return mm("ldk,ldp->lkp", basis, x.astype(jnp.float32))


def side_factors(basis: jax.Array, coef: jax.Array) -> jax.Array:
  """Factor columns of one task: (L, d, K), (L, K, P) → (L, d, P)."""
  return mm("ldk,lkp->ldp", basis, coef)
