"""The jitted per-group merge: new bases from old tasks plus new factor columns, in the small span.

Every column of the stack [β ε_1, …, β ε_T, X_new] lies in span([β, Q_x]), where Q_x holds the
directions of X_new that β lacks (``small_space``: block Gram–Schmidt against the orthonormal β,
so β is not re-factorised, or for a large batch a Householder QR of [β, X_new]). In those
coordinates an old task is its own coefficients ε_i and the new
columns are Y = [βᵀX; Q_xᵀX]. The group keeps a factor S of the old coefficients' scatter
(S Sᵀ = Σ (ε − μ)(ε − μ)ᵀ), so the centred stack has the same left singular vectors as the small
matrix (as in sklearn's IncrementalPCA)

    F = [S,  Y − μ_new,  √(N_old N_new / N) (μ_old − μ_new)]      ((K + M) × (K + M + 1))

whatever the number of tasks. An orthonormal rotation V of the small space, whose leading columns
are the new basis, gives the new basis [β, Q_x] V_k, every task's new coefficients V_kᵀ ε_i and
the new scatter factor. V_kᵀ is not applied to the stored tasks: it is composed into each frame's
map (``share_jax.frames``), so the merge costs the same for 10 tasks or 10 000. The d × (T r)
stack, any d × d matrix and any Gram of the task stack are never formed. Directions without
energy (round-off) are never kept, whatever the k rule.

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
that fraction of F's (centred) energy, or of F's plus what earlier merges dropped (``lost``, so
that the fraction holds for everything absorbed); ``max_task_error``, the smallest k such that
every stored task's share of a ΔW error budget (see ``share_jax.fidelity``) holds. ``energy``
reports the fraction of the stack's uncentred energy (what reconstruction keeps) that the bases
hold.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from share_jax.subspace import FactorGroup, mm, pad_to

_EPS32 = float(jnp.finfo(jnp.float32).eps)


class Rule(NamedTuple):
  """Static k rule of a group: ``kind`` (``k``, ``explained_variance``, ``max_task_error``) with
  its ``value``, capped at ``limit``; ``center`` as in ``SubspaceConfig``; ``absorbed``: explained
  variance is a fraction of everything absorbed (``SubspaceConfig.explained_of``)."""

  kind: str
  value: float
  limit: int
  center: bool
  absorbed: bool = False


def svd_flip_columns(u: jax.Array) -> jax.Array:
  """±1 per column making each column's largest-magnitude entry positive (sklearn's svd_flip),
  from two plain reductions (the largest entry is positive iff max >= -min; ties go to +1)."""
  return jnp.where(jnp.max(u, axis=0) >= -jnp.min(u, axis=0), 1.0, -1.0)


def _extend(basis: jax.Array, cols: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Orthonormal columns Q_x (d, M) ⟂ ``basis`` (d, K, orthonormal or zero columns) spanning
  what of ``cols`` (d, M) the basis lacks, with C = basisᵀ cols (K, M) and R_x = Q_xᵀ cols (M, M),
  so cols = basis C + Q_x R_x up to float32 round-off.

  Block Gram–Schmidt, twice (CGS2), instead of re-factorising [basis, cols]: O(d K M) GEMMs. The
  residual's directions come from a thin SVD of it with every column scaled to its original
  norm; those within 16 ε of a column's norm (round-off of the projection, not content) become
  zero columns, so Q_x never points back into the basis, and a Cholesky QR step makes the
  rest orthonormal again after a last projection."""
  c1 = mm("dk,dm->km", basis, cols)
  x1 = cols - mm("dk,km->dm", basis, c1)
  c2 = mm("dk,dm->km", basis, x1)
  x2 = x1 - mm("dk,km->dm", basis, c2)
  norms = jnp.linalg.norm(cols, axis=0)
  u, s, _ = jnp.linalg.svd(x2 / jnp.where(norms > 0, norms, 1.0), full_matrices=False)
  keep = (s > 16 * _EPS32).astype(u.dtype)
  u = u * keep
  u = u - mm("dk,km->dm", basis, mm("dk,dm->km", basis, u))
  # Cholesky QR of the nearly orthonormal u (zero columns, the last ones, stay zero).
  chol = jnp.linalg.cholesky(mm("dm,dn->mn", u, u) + jnp.diag(1.0 - keep))
  q = jax.scipy.linalg.solve_triangular(chol, u.T, lower=True).T
  return q, c1 + c2, mm("dm,dn->mn", q, cols)


def _householder(basis: jax.Array, cols: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(Q, Y) of a Householder QR [basis, cols] = Q R, with the signs of Q's first K columns set so
  that R's basis block is the identity (β is orthonormal): old coordinates stay as they are."""
  k = basis.shape[1]
  q, r = jnp.linalg.qr(jnp.concatenate([basis, cols], axis=1), mode="reduced")
  sign = jnp.where(jnp.diagonal(r)[:k] < 0, -1.0, 1.0)
  return q.at[:, :k].multiply(sign), r[:, k:].at[:k].multiply(sign[:, None])


def small_space(basis: jax.Array, cols: jax.Array) -> tuple[jax.Array, jax.Array]:
  """An orthonormal Q (d, n) whose first K columns are ``basis`` (d, K) and whose span holds
  ``cols`` (d, M), and the columns' coordinates Y (n, M) in it: cols = Q Y. By Gram–Schmidt
  (``_extend``) where that is cheaper than a Householder QR of [basis, cols] (few new columns),
  else by the QR (a batch of many adapters)."""
  d, k = basis.shape
  m = cols.shape[1]
  gram_schmidt = 8 * d * k * m + 5 * d * m * m + 22 * m**3
  householder = 4 * d * (k + m) ** 2 - (4 * (k + m) ** 3) // 3
  if gram_schmidt >= householder:
    return _householder(basis, cols)
  q_x, c, r_x = _extend(basis, cols)
  return jnp.concatenate([basis, q_x], axis=1), jnp.concatenate([c, r_x], axis=0)


def _stack_factors(scatter, coef_sum, n_old, y, y_valid, center: bool):
  """(F, G): F Fᵀ is the (centred) scatter of all columns in the small space [basis, Q_x], G Gᵀ
  the uncentred one. ``scatter`` (K, K), ``coef_sum`` (K,) and ``n_old`` of the stored columns;
  ``y`` (n, M) the new columns."""
  n, k = y.shape[0], scatter.shape[0]
  old = jnp.pad(scatter, ((0, n - k), (0, 0)))
  f = jnp.concatenate([old, y], axis=1)
  if not center:
    return f, f
  n_new = jnp.sum(y_valid).astype(jnp.float32)
  total = jnp.maximum(n_old + n_new, 1.0)
  sum_old, sum_new = jnp.pad(coef_sum, (0, n - k)), jnp.sum(y, axis=1)
  mu_old, mu_new = sum_old / jnp.maximum(n_old, 1.0), sum_new / jnp.maximum(n_new, 1.0)
  y_c = (y - mu_new[:, None]) * y_valid
  corr = jnp.sqrt(n_old * n_new / total) * (mu_old - mu_new)
  f = jnp.concatenate([old, y_c, corr[:, None]], axis=1)
  mean_col = (sum_old + sum_new) / jnp.sqrt(total)  # √N μ
  return f, jnp.concatenate([f, mean_col[:, None]], axis=1)


def _rotation(f: jax.Array, g: jax.Array, center: bool) -> jax.Array:
  """An orthonormal n × n V whose leading columns are the best bases (see the module doc).

  One SVD either way: with a mean direction v0, of H F with H the Householder reflection taking
  v0 to ±e_1, its first row (F along μ) replaced by a single entry larger than ‖F‖, so that e_1
  comes first and the rest are the principal directions of F with μ removed; V = H U."""
  n = f.shape[0]
  if not center or n == 1:
    return jnp.linalg.svd(f, full_matrices=False)[0]
  mean = g[:, -1]
  norm = jnp.linalg.norm(mean)
  has_mean = norm > n * _EPS32 * jnp.linalg.norm(g)
  v0 = mean / jnp.where(has_mean, norm, 1.0)
  h = v0.at[0].add(jnp.where(v0[0] >= 0, 1.0, -1.0))
  h = h * (has_mean / jnp.maximum(jnp.linalg.norm(h), 1e-30))
  house = jnp.eye(n) - 2.0 * jnp.outer(h, h)  # the identity when there is no mean direction
  hf = mm("nm,mc->nc", house, f)
  f_norm = jnp.linalg.norm(f)
  lead = jnp.where(has_mean, 2.0 * f_norm + (f_norm == 0), 0.0)
  first = jnp.zeros((n, 1), f.dtype).at[0, 0].set(lead)
  hf = hf.at[0].multiply(1.0 - has_mean)
  u, _, _ = jnp.linalg.svd(jnp.concatenate([first, hf], axis=1), full_matrices=False)
  return mm("nm,mj->nj", house, u)


def _want(rule: Rule, energies, lost, w, partner, beta, size: int) -> jax.Array:
  """The k (>= 1, <= limit) that the rule asks for, given the rotation's column energies (n,),
  the energy earlier merges dropped and the tasks' rotated coordinates ``w`` (n, T, P)."""
  if rule.kind == "k":
    return jnp.asarray(min(int(rule.value), rule.limit), jnp.int32)
  if rule.kind == "explained_variance":
    c = jnp.where(energies > (size * _EPS32) ** 2 * jnp.max(energies), energies, 0.0)
    cum = jnp.cumsum(c)
    total = cum[-1] + lost if rule.absorbed else cum[-1]
    want = 1 + jnp.sum(cum[:-1] < rule.value * total)
  else:  # max_task_error: per task, this side's share of the budget (fidelity module doc)
    # w_iᵀ partner w_i per task and row: one fused product reduced over p, q (XLA CPU runs it
    # several times faster than T tiny batched dots).
    drop = jnp.sum(w[..., :, None] * w[..., None, :] * partner[None], axis=(2, 3)).T
    suffix = jnp.cumsum(drop[:, ::-1], axis=1)[:, ::-1]  # Σ_{i >= k}, no cancellation
    suffix = jnp.concatenate([suffix, jnp.zeros_like(suffix[:, :1])], axis=1)
    own = jnp.sum(drop, axis=1)  # ‖ΔW_kernel‖² (the rotation is orthonormal)
    allow = (0.5 * beta + (size * _EPS32) ** 2) * own
    ok = jnp.all(suffix <= allow[:, None], axis=0)
    want = jnp.maximum(jnp.argmax(ok), 1)
  return jnp.minimum(want, rule.limit).astype(jnp.int32)


def task_grams(w: jax.Array) -> jax.Array:
  """Per task, Σ_i w_iᵀ w_i: (n, T, P) → (T, P, P). A broadcast product reduced over the leading
  axis (XLA CPU runs it several times faster than T tiny batched dots)."""
  return jnp.sum(w[:, :, :, None] * w[:, :, None, :], axis=0)


def _task_outputs(w, keep, scale, k_out: int):
  """For new tasks with rotated coordinates w (n, m, P): their coefficients (k_out, m, P), the
  kept rows sign-flipped, and the Grams (m, P, P) of what is kept and dropped (sums of PSD terms:
  no cancelling)."""
  pad = max(k_out - w.shape[0], 0)
  new = scale[:, None, None] * jnp.pad(w, ((0, pad), (0, 0), (0, 0)))[:k_out]
  return new, task_grams(w * keep[:, None, None]), task_grams(w * (1.0 - keep)[:, None, None])


def _merge_one(
  basis,
  scatter,
  lost,
  coef,
  coef_sum,
  maps,
  ncols,
  partner,
  x,
  x_ncols,
  start,
  frame,
  beta,
  *,
  k_out,
  rule,
):
  """One (kernel, side) slot. basis (d, K), coef (Kc, T, P) in frame coordinates (current ones,
  Kc = K, when the rule is ``max_task_error``: the driver settles first), coef_sum (K,), maps
  (F, K, Kc), partner (T, P, P), x (m, d, P); the new tasks open ``frame``."""
  d, k_in = basis.shape
  m, _, p = x.shape
  cols = jnp.transpose(x, (1, 0, 2)).reshape(d, m * p)
  y_valid = (jnp.arange(p)[None, :] < x_ncols[:, None]).reshape(m * p)
  q, y = small_space(basis, cols)  # old tasks' coordinates are their coefficients
  n = q.shape[1]
  n_old = jnp.sum(ncols).astype(jnp.float32)
  f, g = _stack_factors(scatter, coef_sum, n_old, y, y_valid, rule.center)
  v = _rotation(f, g, rule.center)
  # Coordinates in the rotated space (n, ·, P): old tasks' are their coefficients, new ones' Y.
  w_new = mm("ni,nmp->imp", v, y.reshape(n, m, p))
  w_all = None
  if rule.kind == "max_task_error":  # the rule reads every task's rotated coordinates
    w_all = jax.lax.dynamic_update_slice_in_dim(mm("ki,ktp->itp", v[:k_in], coef), w_new, start, 1)
  energies = jnp.sum(mm("ni,nc->ic", v, f) ** 2, axis=1)
  size = max(f.shape)
  kept_g = jnp.sum(mm("ni,nc->ic", v, g) ** 2, axis=1)
  # Directions without energy are round-off: never keep them, whatever the rule, nor grow the
  # capacity for them.
  rank = jnp.sum(kept_g > (size * _EPS32) ** 2 * jnp.max(kept_g))
  want = jnp.minimum(_want(rule, energies, lost, w_all, partner, beta, size), jnp.maximum(rank, 1))
  k_sel = jnp.minimum(want, min(k_out, n))
  keep = (jnp.arange(n) < k_sel).astype(jnp.float32)
  pad = max(k_out - n, 0)
  v_k = jnp.pad(v * keep, ((0, 0), (0, pad)))[:, :k_out]
  new_basis = mm("dn,nk->dk", q, v_k)
  flip = svd_flip_columns(new_basis)
  new_basis, v_k = new_basis * flip, v_k * flip
  scale = jnp.pad(keep, (0, pad))[:k_out] * flip
  # Old coordinates to new ones (k_out, K): composed into every frame's map, not applied to tasks.
  step = v_k[:k_in].T
  new_coef, kept_gram, res = _task_outputs(w_new, keep, scale, k_out)
  kc = max(coef.shape[0], k_out)  # frame coordinates never shrink
  maps = pad_to(mm("kj,fji->fki", step, maps), (2,), kc).at[frame].set(jnp.eye(k_out, kc))
  coef_sum = mm("kj,j->k", step, coef_sum) + jnp.sum(new_coef, axis=(1, 2))
  proj = mm("nk,nc->ck", v_k, f)  # (c, K): S Sᵀ = projᵀ proj
  proj = jnp.pad(proj, ((0, max(k_out - proj.shape[0], 0)), (0, 0)))
  new_scatter = jnp.linalg.qr(proj, mode="r").T
  total = jnp.sum(kept_g)
  energy = jnp.where(total > 0, jnp.sum(kept_g * keep) / jnp.where(total > 0, total, 1.0), 1.0)
  lost = lost + jnp.sum(energies * (1.0 - keep))  # ‖F‖² = ‖S_new‖² + what this merge drops
  out = (new_basis, k_sel, pad_to(new_coef, (0,), kc), new_scatter, energy, lost, coef_sum, maps)
  return out, want, res, kept_gram


@functools.partial(jax.jit, static_argnames=("k_out", "rule"))
def merge_group(
  group: FactorGroup,
  x: jax.Array,
  x_ncols: jax.Array,
  start: jax.Array,
  frame: jax.Array,
  partner: jax.Array | None,
  beta: jax.Array | None,
  *,
  k_out: int,
  rule: Rule,
) -> tuple[FactorGroup, jax.Array, jax.Array, jax.Array, jax.Array]:
  """Fold new factor columns into a group; stored tasks are not touched (their frames' maps are),
  and the new tasks' coefficients come back apart, for ``write_rows``.

  Args:
    group: bases (L, d, K), coefficients (L, Kc, T, P) of the tasks already held, with frames.
    x: new tasks' factor columns (m, L, d, P), zero-padded; ``x_ncols`` (m, L) their counts.
    start: task row where the m new tasks go (``start + m <= T``); ``frame`` the frame they open
      (no held task's frame is >= it).
    partner: (T, L, P, P) Grams of the other side of each row's kernel, before the merge (new
      tasks in their rows); ``beta`` (T,) each task's squared error budget relative to its ΔW.
      Only the ``max_task_error`` rule reads them (None otherwise), on a settled group.
    k_out: basis capacity of the result; ``rule``: how many columns are active.

  Returns:
    The new group (capacity K = ``k_out``; ``coef`` None and ``frame_basis`` as given: the
    caller writes the rows and keeps the frame bases, references to past bases), the new tasks'
    coefficients (L, Kc', m, P) in frame coordinates of width Kc' = max(Kc, K), the k each
    slot's rule wanted (L,), so a caller can
    grow the capacity and merge again when it is too small, and per new task the Grams
    (m, L, P, P) of what the merge dropped from its columns and of what it kept.
  """
  merge = functools.partial(_merge_one, k_out=k_out, rule=rule)
  p_axis = None if partner is None else 1
  axes = (0,) * 6 + (1, p_axis, 1, 1, None, None, None)
  out, want, res, kept = jax.vmap(merge, in_axes=axes, out_axes=(0, 0, 1, 1))(
    group.basis,
    group.scatter,
    group.lost,
    group.coef,
    group.coef_sum,
    group.maps,
    group.ncols,
    partner,
    x.astype(jnp.float32),
    x_ncols,
    start,
    frame,
    beta,
  )
  basis, rank, rows, scatter, energy, lost, coef_sum, maps = out
  m = x.shape[0]
  ncols = jax.lax.dynamic_update_slice_in_dim(group.ncols, x_ncols.astype(jnp.int32), start, axis=0)
  frames = jax.lax.dynamic_update_slice_in_dim(group.frame, jnp.full((m,), frame), start, axis=0)
  merged = FactorGroup(
    basis, rank, None, ncols, scatter, energy, lost, frames, maps, group.frame_basis, coef_sum
  )
  return merged, rows, want, res, kept


def _put_rows(coef: jax.Array, rows: jax.Array, start: jax.Array) -> jax.Array:
  return jax.lax.dynamic_update_slice_in_dim(pad_to(coef, (1,), rows.shape[1]), rows, start, 2)


_put = jax.jit(_put_rows)
_put_in_place = jax.jit(_put_rows, donate_argnums=0)


def write_rows(coef: jax.Array, rows: jax.Array, start: jax.Array, donate: bool) -> jax.Array:
  """``coef`` (L, Kc, T, P), zero-padded to rows' width Kc', with ``rows`` (L, Kc', m, P) as task
  rows ``start`` … ``start + m - 1``. A functional update copies all T rows; with ``donate``
  the write reuses ``coef``'s buffer, which is then deleted (when Kc' = Kc: a wider result
  needs a new buffer anyway)."""
  in_place = donate and rows.shape[1] == coef.shape[1]
  return (_put_in_place if in_place else _put)(coef, rows, start)


@functools.partial(jax.jit, static_argnames=("center",))
def scatter_factor(coef: jax.Array, ncols: jax.Array, *, center: bool) -> jax.Array:
  """S with S Sᵀ = the (centred) scatter of all stored coefficient columns.

  (L, K, T, P) coefficients, (T, L) column counts → (L, K, K).

  Needed after coefficients change outside a merge (fine-tuning); the Gram route loses directions
  below ~1e-7 of the largest, which only fine-tuned (hence perturbed) coefficients can have.
  """
  gram = mm("lktp,ljtp->lkj", coef, coef)
  if center:
    n = jnp.maximum(jnp.sum(ncols, axis=0), 1).astype(jnp.float32)
    s = jnp.sum(coef, axis=(2, 3))
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
