"""The jitted per-group merge: new bases from old tasks plus new factor columns, in the small span.

Every column of the stack [β ε_1, …, β ε_T, X_new] lies in span([β, X_new]). One reduced QR
[β, X_new] = Q R gives coordinates: old tasks R_β ε_i, new columns Y = R_X. The group keeps a
factor S of the old coefficients' scatter (S Sᵀ = Σ (ε − μ)(ε − μ)ᵀ), so the centred stack has
the same left singular vectors as the small matrix (as in sklearn's IncrementalPCA)

    F = [R_β S,  Y − μ_new,  √(N_old N_new / N) (R_β μ_old − μ_new)]      ((K + M) × (K + M + 1))

whatever the number of tasks. Its SVD F = U Σ Vᵀ gives the new basis Q U_k, every task's new
coefficients U_kᵀ R_β ε_i, and the new scatter factor Σ_k. The d × (T r) stack, any d × d matrix
and any Gram of the task stack are never formed.
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
  """``jnp.einsum`` at full float32 precision (TPU/TF32 defaults would ruin the merge)."""
  return jnp.einsum(spec, *args, precision=HIGHEST)


def choose_k(sigma: jax.Array, rule: Rule, size: int) -> tuple[jax.Array, jax.Array]:
  """(k wanted by the rule, cumulative energies) for singular values sorted descending.

  Singular values below float32 round-off (size · eps · σ_max) count as zero, so that with
  ``explained_variance=1`` k is the numerical rank.
  """
  sigma = jnp.where(sigma > size * _EPS32 * sigma[0], sigma, 0.0)
  cum = jnp.cumsum(sigma**2)
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


def _small_factor(r_old, scatter, coef, ncols, y, y_valid, center: bool) -> jax.Array:
  """F, whose left singular vectors are those of the (centred) stack of all columns."""
  if not center:
    return jnp.concatenate([mm("nk,kj->nj", r_old, scatter), y], axis=1)
  n_old = jnp.sum(ncols).astype(jnp.float32)
  n_new = jnp.sum(y_valid).astype(jnp.float32)
  mu_old = jnp.sum(coef, axis=(0, 2)) / jnp.maximum(n_old, 1.0)
  mu_new = jnp.sum(y, axis=1) / jnp.maximum(n_new, 1.0)
  y_c = (y - mu_new[:, None]) * y_valid
  corr = jnp.sqrt(n_old * n_new / jnp.maximum(n_old + n_new, 1.0)) * (r_old @ mu_old - mu_new)
  return jnp.concatenate([mm("nk,kj->nj", r_old, scatter), y_c, corr[:, None]], axis=1)


def _merge_one(basis, scatter, coef, ncols, x, x_ncols, *, k_out: int, rule: Rule):
  """One (kernel, side) slot. basis (d, K), coef (T, K, P), x (m, d, P) → see ``merge_group``."""
  d, k_in = basis.shape
  m, _, p = x.shape
  cols = jnp.transpose(x, (1, 0, 2)).reshape(d, m * p)
  y_valid = (jnp.arange(p)[None, :] < x_ncols[:, None]).reshape(m * p)
  q, r = jnp.linalg.qr(jnp.concatenate([basis, cols], axis=1), mode="reduced")
  r_old, y = r[:, :k_in], r[:, k_in:]
  f = _small_factor(r_old, scatter, coef, ncols, y, y_valid, rule.center)
  u, sigma, _ = jnp.linalg.svd(f, full_matrices=False)
  want, cum = choose_k(sigma, rule, max(f.shape))
  n = u.shape[1]
  k_sel = jnp.minimum(want, min(k_out, n))
  keep = jnp.arange(k_out) < k_sel
  u = jnp.pad(u, ((0, 0), (0, max(k_out - n, 0))))[:, :k_out] * keep
  sigma = jnp.pad(sigma, (0, max(k_out - n, 0)))[:k_out] * keep
  new_basis = mm("dn,nk->dk", q, u)
  flip = svd_flip_columns(new_basis)
  new_basis, u = new_basis * flip, u * flip
  new_coef = mm("nk,nj,tjp->tkp", u, r_old, coef)
  x_coef = mm("nk,nq->kq", u, y).reshape(k_out, m, p).transpose(1, 0, 2)
  total = cum[-1]
  energy = jnp.where(total > 0, cum[k_sel - 1] / jnp.where(total > 0, total, 1.0), 1.0)
  return new_basis, k_sel, new_coef, x_coef, jnp.diag(sigma), energy, want


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
  merge = functools.partial(_merge_one, k_out=k_out, rule=rule)
  basis, rank, coef, x_coef, scatter, energy, want = jax.vmap(
    merge, in_axes=(0, 0, 1, 1, 1, 1), out_axes=(0, 0, 1, 1, 0, 0, 0)
  )(group.basis, group.scatter, group.coef, group.ncols, x.astype(jnp.float32), x_ncols)
  coef = jax.lax.dynamic_update_slice_in_dim(coef, x_coef, start, axis=0)
  ncols = jax.lax.dynamic_update_slice_in_dim(group.ncols, x_ncols.astype(jnp.int32), start, axis=0)
  return FactorGroup(basis, rank, coef, ncols, scatter, energy), want


@functools.partial(jax.jit, static_argnames=("center",))
def scatter_factor(coef: jax.Array, ncols: jax.Array, *, center: bool) -> jax.Array:
  """S with S Sᵀ = the (centred) scatter of all stored coefficient columns.

  (T, L, K, P) coefficients, (T, L) column counts → (L, K, K).

  Needed after coefficients change outside a merge (fine-tuning); the Gram route loses directions
  below ~1e-7 of the largest, which only fine-tuned (hence perturbed) coefficients can have.
  """
  gram = mm("tlkp,tljp->lkj", coef, coef)
  if center:
    n = jnp.maximum(jnp.sum(ncols, axis=0), 1).astype(jnp.float32)
    s = jnp.sum(coef, axis=(0, 3))
    gram = gram - s[:, :, None] * s[:, None, :] / n[:, None, None]
  lam, v = jnp.linalg.eigh(0.5 * (gram + jnp.swapaxes(gram, 1, 2)))
  return v * jnp.sqrt(jnp.maximum(lam, 0.0))[:, None, :]


@jax.jit
def project_group(basis: jax.Array, x: jax.Array) -> jax.Array:
  """Coefficients of factor columns in the current basis: (L, d, K), (L, d, P) → (L, K, P)."""
  return mm("ldk,ldp->lkp", basis, x.astype(jnp.float32))


def side_factors(basis: jax.Array, coef: jax.Array) -> jax.Array:
  """Factor columns of one task: (L, d, K), (L, K, P) → (L, d, P)."""
  return mm("ldk,lkp->ldp", basis, coef)
