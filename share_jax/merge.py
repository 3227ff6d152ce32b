"""The jitted per-group merge: new bases from old tasks plus new factor columns, in the small span.

Every column of the stack [β ε_1, …, β ε_T, X_new] lies in span([β, X_new]). One reduced QR
[β, X_new] = Q R gives coordinates: old tasks Z_i = R_β ε_i, new columns Y = R_X. The group keeps a
factor S of the old coefficients' scatter (S Sᵀ = Σ (ε − μ)(ε − μ)ᵀ), so the centred stack has
the same left singular vectors as the small matrix (as in sklearn's IncrementalPCA)

    F = [R_β S,  Y − μ_new,  √(N_old N_new / N) (R_β μ_old − μ_new)]      ((K + M) × (K + M + 1))

whatever the number of tasks. An orthonormal rotation V of the small space, whose leading columns
are the new basis, gives the new basis Q V_k, every task's new coefficients V_kᵀ Z_i and the new
scatter factor. The d × (T r) stack, any d × d matrix and any Gram of the task stack are never
formed.

Centring and the mean direction. Coefficients are uncentred projections (reconstruction is
β βᵀ X, as in the paper's code), so a basis spanning only the centred stack loses the mean
direction μ: one task keeps a third of its ΔW at ``explained_variance=1``. With ``center`` the
rotation's first column is μ/‖μ‖ (IncrementalPCA keeps ``mean_`` for the same reason) and the
others are the principal directions of F with μ projected out, i.e. the paper's centred principal
directions made orthogonal to the mean. Among all k-dimensional bases that contain μ this keeps the
most of the stored columns, so the k − 1 columns after μ are the best the centred analysis can
offer, and explained variance 1 keeps every task exactly. ``center=False`` takes the top left
singular vectors of the uncentred stack (the best k columns for the stack as a whole).

k rules (``Rule``): a fixed ``k``; ``explained_variance``, the smallest k whose columns explain
that fraction of F's (centred) energy; ``max_task_error``, the smallest k such that every stored
task's share of a ΔW error budget (see ``share_jax.fidelity``) holds. ``energy`` reports the
fraction of the stack's uncentred energy (what reconstruction keeps) that the bases hold.
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
  """Static k rule of a group: ``kind`` (``k``, ``explained_variance``, ``max_task_error``) with
  its ``value``, capped at ``limit``; ``center`` as in ``SubspaceConfig``."""

  kind: str
  value: float
  limit: int
  center: bool


def mm(spec: str, *args: jax.Array) -> jax.Array:
  """``jnp.einsum`` at full float32 precision (TPU/TF32 defaults would ruin the merge)."""
  return jnp.einsum(spec, *args, precision=HIGHEST)


def svd_flip_columns(u: jax.Array) -> jax.Array:
  """±1 per column making each column's largest-magnitude entry positive (sklearn's svd_flip)."""
  idx = jnp.argmax(jnp.abs(u), axis=0)
  s = jnp.sign(u[idx, jnp.arange(u.shape[1])])
  return jnp.where(s == 0, 1.0, s)


def _stack_factors(r_old, scatter, coef, ncols, y, y_valid, center: bool):
  """(F, G): F F^T is the (centred) scatter of all columns, G G^T the uncentred one."""
  f = jnp.concatenate([mm("nk,kj->nj", r_old, scatter), y], axis=1)
  if not center:
    return f, f
  n_old = jnp.sum(ncols).astype(jnp.float32)
  n_new = jnp.sum(y_valid).astype(jnp.float32)
  n = jnp.maximum(n_old + n_new, 1.0)
  sum_old = mm("nk,k->n", r_old, jnp.sum(coef, axis=(0, 2)))
  sum_new = jnp.sum(y, axis=1)
  mu_old, mu_new = sum_old / jnp.maximum(n_old, 1.0), sum_new / jnp.maximum(n_new, 1.0)
  y_c = (y - mu_new[:, None]) * y_valid
  corr = jnp.sqrt(n_old * n_new / n) * (mu_old - mu_new)
  f = jnp.concatenate([mm("nk,kj->nj", r_old, scatter), y_c, corr[:, None]], axis=1)
  mean_col = (sum_old + sum_new) / jnp.sqrt(n)  # √N μ
  return f, jnp.concatenate([f, mean_col[:, None]], axis=1)


def _rotation(f: jax.Array, g: jax.Array, center: bool) -> jax.Array:
  """An orthonormal n × n V whose leading columns are the best bases (see the module doc)."""
  u, _, _ = jnp.linalg.svd(f, full_matrices=False)
  n = f.shape[0]
  if not center or n == 1:
    return u
  mean = g[:, -1]
  norm = jnp.linalg.norm(mean)
  has_mean = norm > n * _EPS32 * jnp.linalg.norm(g)
  v0 = mean / jnp.where(has_mean, norm, 1.0)
  # Householder H (symmetric, orthogonal) with H v0 = ∓e_1: rows 2… of H F are F with μ removed.
  h = v0.at[0].add(jnp.where(v0[0] >= 0, 1.0, -1.0))
  h = h / jnp.maximum(jnp.linalg.norm(h), 1e-30)
  house = jnp.eye(n) - 2.0 * jnp.outer(h, h)
  rest, _, _ = jnp.linalg.svd(mm("nm,mc->nc", house, f)[1:], full_matrices=False)
  v_mean = jnp.concatenate([house[:, :1], mm("nm,mj->nj", house[:, 1:], rest)], axis=1)
  return jnp.where(has_mean, v_mean, u)


def _want(rule: Rule, energies, w, z, partner, beta, size: int) -> jax.Array:
  """The k (>= 1, <= limit) that the rule asks for, given the rotation's column energies (n,) and
  the tasks' rotated coordinates ``w`` (T, n, P)."""
  if rule.kind == "k":
    return jnp.asarray(min(int(rule.value), rule.limit), jnp.int32)
  if rule.kind == "explained_variance":
    c = jnp.where(energies > (size * _EPS32) ** 2 * jnp.max(energies), energies, 0.0)
    cum = jnp.cumsum(c)
    want = 1 + jnp.sum(cum[:-1] < rule.value * cum[-1])
  else:  # max_task_error: per task, this side's share of the budget (fidelity module doc)
    drop = jnp.einsum("tip,tpq,tiq->ti", w, partner, w, precision=HIGHEST)
    suffix = jnp.cumsum(drop[:, ::-1], axis=1)[:, ::-1]  # Σ_{i >= k}, no cancellation
    suffix = jnp.concatenate([suffix, jnp.zeros_like(suffix[:, :1])], axis=1)
    own = jnp.einsum("tnp,tnq,tpq->t", z, z, partner, precision=HIGHEST)  # ‖ΔW_kernel‖²
    allow = (0.5 * beta + (size * _EPS32) ** 2) * own
    ok = jnp.all(suffix <= allow[:, None], axis=0)
    want = jnp.maximum(jnp.argmax(ok), 1)
  return jnp.minimum(want, rule.limit).astype(jnp.int32)


def _merge_one(basis, scatter, coef, ncols, partner, x, x_ncols, start, beta, *, k_out, rule):
  """One (kernel, side) slot. basis (d, K), coef (T, K, P), partner (T, P, P), x (m, d, P)."""
  d, k_in = basis.shape
  m, _, p = x.shape
  cols = jnp.transpose(x, (1, 0, 2)).reshape(d, m * p)
  y_valid = (jnp.arange(p)[None, :] < x_ncols[:, None]).reshape(m * p)
  q, r = jnp.linalg.qr(jnp.concatenate([basis, cols], axis=1), mode="reduced")
  n = q.shape[1]
  r_old, y = r[:, :k_in], r[:, k_in:]
  z = mm("nk,tkp->tnp", r_old, coef)  # every task's columns in the small space
  z = jax.lax.dynamic_update_slice_in_dim(z, y.reshape(n, m, p).transpose(1, 0, 2), start, 0)
  f, g = _stack_factors(r_old, scatter, coef, ncols, y, y_valid, rule.center)
  v = _rotation(f, g, rule.center)
  w = mm("ni,tnp->tip", v, z)
  want = _want(rule, jnp.sum(mm("ni,nc->ic", v, f) ** 2, axis=1), w, z, partner, beta, max(f.shape))
  k_sel = jnp.minimum(want, min(k_out, n))
  keep = (jnp.arange(n) < k_sel).astype(jnp.float32)
  kept = w * keep[None, :, None]
  res = mm("tip,tiq->tpq", w - kept, w - kept)
  v_k = jnp.pad(v * keep, ((0, 0), (0, max(k_out - n, 0))))[:, :k_out]
  new_basis = mm("dn,nk->dk", q, v_k)
  flip = svd_flip_columns(new_basis)
  new_basis, v_k = new_basis * flip, v_k * flip
  new_coef = jnp.pad(kept, ((0, 0), (0, max(k_out - n, 0)), (0, 0)))[:, :k_out]
  new_coef = new_coef * flip[None, :, None]
  proj = mm("nk,nc->ck", v_k, f)  # (c, K): S Sᵀ = projᵀ proj
  proj = jnp.pad(proj, ((0, max(k_out - proj.shape[0], 0)), (0, 0)))
  new_scatter = jnp.linalg.qr(proj, mode="r").T
  kept_g = jnp.sum(mm("nk,nc->kc", v_k, g) ** 2)
  total = jnp.sum(g**2)
  energy = jnp.where(total > 0, kept_g / jnp.where(total > 0, total, 1.0), 1.0)
  return new_basis, k_sel, new_coef, new_scatter, energy, want, res


@functools.partial(jax.jit, static_argnames=("k_out", "rule"))
def merge_group(
  group: FactorGroup,
  x: jax.Array,
  x_ncols: jax.Array,
  start: jax.Array,
  partner: jax.Array,
  beta: jax.Array,
  *,
  k_out: int,
  rule: Rule,
) -> tuple[FactorGroup, jax.Array, jax.Array]:
  """Fold new factor columns into a group and re-project every stored task.

  Args:
    group: bases (L, d, K), coefficients (T, L, K, P) of the tasks already held.
    x: new tasks' factor columns (m, L, d, P), zero-padded; ``x_ncols`` (m, L) their counts.
    start: task row where the m new tasks go (``start + m <= T``).
    partner: (T, L, P, P) Grams of the other side of each row's kernel, before the merge (new
      tasks in their rows); ``beta`` (T,) each task's squared error budget relative to its ΔW
      (used by the ``max_task_error`` rule).
    k_out: basis capacity of the result; ``rule``: how many columns are active.

  Returns:
    The new group (capacity K = ``k_out``), the k each slot's rule wanted (L,), so a caller can
    grow the capacity and merge again when it is too small, and the Grams (T, L, P, P) of what
    the merge dropped from every task's columns.
  """
  merge = functools.partial(_merge_one, k_out=k_out, rule=rule)
  basis, rank, coef, scatter, energy, want, res = jax.vmap(
    merge, in_axes=(0, 0, 1, 1, 1, 1, 1, None, None), out_axes=(0, 0, 1, 0, 0, 0, 1)
  )(
    group.basis,
    group.scatter,
    group.coef,
    group.ncols,
    partner,
    x.astype(jnp.float32),
    x_ncols,
    start,
    beta,
  )
  ncols = jax.lax.dynamic_update_slice_in_dim(group.ncols, x_ncols.astype(jnp.int32), start, axis=0)
  return FactorGroup(basis, rank, coef, ncols, scatter, energy), want, res


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
