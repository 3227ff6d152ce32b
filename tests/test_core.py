"""Core numerics against float64 NumPy references: init, absorb, project, reconstruct, apply."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_reference import (
  Planted,
  active_basis,
  basis_ref,
  delta_error,
  projector_distance,
  rel_err,
  side_columns,
  task_columns,
)

import share_jax as sj
from share_jax import _driver, apply, merge
from share_jax import frames as frames_mod
from share_jax.subspace import FRAMES, SIDES


def stack(loras, path, side):
  return np.concatenate([side_columns(sj.lora_leaves(t)[path], side) for t in loras], axis=1)


@pytest.mark.parametrize("center", [True, False])
def test_init_matches_explicit_stack_svd(center):
  pl = Planted(seed=1)
  loras = pl.loras(5, rank=3) + pl.loras(2, rank=2)  # mixed ranks in one call
  sub = sj.init_subspace(pl.params, loras, k=4, center=center)
  for path in pl.shapes:
    for side in SIDES:
      x = stack(loras, path, side)
      u_ref, k, _ = basis_ref(x, center=center, k=4)
      u = active_basis(sub, path, side)
      assert u.shape[1] == k
      np.testing.assert_allclose(u.T @ u, np.eye(k), atol=1e-5)
      assert projector_distance(u, u_ref) < 1e-4
      for i, lora in enumerate(loras):  # coefficients = uncentred projection βᵀ X
        cols = side_columns(sj.lora_leaves(lora)[path], side)
        assert rel_err(task_columns(sub, i, path, side), u_ref @ (u_ref.T @ cols)) < 1e-4


def test_compress_chooses_the_bases_from_all_stored_tasks():
  """Store losslessly, then compress to k = 4: the bases and every task are the explicit-stack
  SVD's of all tasks (float64), and each error bound is the true error."""
  center = True  # the uncentred rotation is the same merge, tested by init/absorb above
  pl = Planted(seed=3, shapes={f"enc/l0/{m}/kernel": (24, 24) for m in ("q", "v")})
  loras = pl.loras(6, rank=3)
  sub = sj.compress(sj.init_subspace(pl.params, loras, explained_variance=1.0, center=center), k=4)
  for path in pl.shapes:
    for side in SIDES:
      u_ref, _, _ = basis_ref(stack(loras, path, side), center=center, k=4)
      assert projector_distance(active_basis(sub, path, side), u_ref) < 1e-4
      for i, lora in enumerate(loras):
        cols = side_columns(sj.lora_leaves(lora)[path], side)
        assert rel_err(task_columns(sub, i, path, side), u_ref @ (u_ref.T @ cols)) < 1e-4
  for i, lora in enumerate(loras):
    true = delta_error(sj.lora_leaves(sj.reconstruct(sub, i)), sj.lora_leaves(lora))
    assert abs(sj.task_errors(sub)[i] - true) < 1e-4
  with pytest.raises(sj.ShareError, match="at least one task"):
    sj.compress(sj.empty_subspace(pl.params, "kernel$"), k=2)


def test_explained_variance_chooses_the_reference_k():
  pl = Planted(seed=2, hidden=6, noise=0.02)
  loras = pl.loras(6, rank=4)
  path = "enc/l0/value/kernel"
  _, _, lam = basis_ref(stack(loras, path, "a"), center=True)
  cum = np.cumsum(lam) / lam.sum()
  ev = float((cum[2] + cum[3]) / 2)  # midway between two steps: k = 4 without ambiguity
  sub = sj.init_subspace(pl.params, loras, explained_variance=ev)
  assert sub.ranks()[(path, "a")] == 4
  for (p, side), k in sub.ranks().items():
    _, k_ref, _ = basis_ref(stack(loras, p, side), center=True, ev=ev)
    assert abs(k - k_ref) <= 1 if np.isclose(ev, 0) else k == k_ref


def test_uncentred_full_variance_reconstructs_every_task_exactly():
  pl = Planted(seed=3)
  loras = pl.loras(4, rank=3, alpha=6.0) + [pl.lora_tree(5, alpha=10.0)]
  sub = sj.init_subspace(pl.params, loras, explained_variance=1.0, center=False)
  for i, lora in enumerate(loras):
    rec = sj.lora_leaves(sj.reconstruct(sub, i))
    for path, orig in sj.lora_leaves(lora).items():
      assert rec[path].rank == orig.rank
      assert rel_err(rec[path].delta(), orig.delta()) < 1e-5


@pytest.mark.parametrize("center", [True, False])
def test_absorb_equals_explicit_stack_of_reconstructions(center):
  pl = Planted(seed=4)
  sub = sj.init_subspace(pl.params, pl.loras(6, rank=3), k=5, center=center)
  new = pl.loras(3, rank=4)
  out = sj.absorb(sub, new, task_ids=["x", "y", "z"])
  assert out.task_ids == (0, 1, 2, 3, 4, 5, "x", "y", "z")
  for path in pl.shapes:
    for side in SIDES:
      old = [task_columns(sub, t, path, side) for t in sub.task_ids]
      x = np.concatenate(old + [stack(new, path, side)], axis=1)
      u_ref, _, _ = basis_ref(x, center=center, k=5)
      assert projector_distance(active_basis(out, path, side), u_ref) < 1e-4
      for t, cols in zip(out.task_ids, old + [stack([n], path, side) for n in new], strict=True):
        assert rel_err(task_columns(out, t, path, side), u_ref @ (u_ref.T @ cols)) < 1e-4


def test_absorb_leaves_the_input_state_untouched():
  pl = Planted(seed=5)
  sub = sj.init_subspace(pl.params, pl.loras(3), k=4)
  before = jax.tree.map(np.array, sub)
  sj.absorb(sub, pl.loras(1), task_ids=["new"])
  chex.assert_trees_all_equal(before, jax.tree.map(np.array, sub))
  assert sub.task_ids == (0, 1, 2)


@pytest.mark.parametrize("held", [3, 9])
def test_donated_absorbs_equal_copying_ones_and_consume_their_input(held):
  """``FRAMES`` single absorbs, in place or not, give the same stored state. When the frame slots
  run out, 3 held tasks settle (into new buffers: that absorb consumes nothing) and 9 fold the
  young frames (in place); every other donated absorb deletes its argument's coefficients."""
  pl = Planted(seed=5)
  new = pl.loras(FRAMES + 1)
  copied = donated = sj.init_subspace(pl.params, pl.loras(held), k=4, task_capacity=32)
  for i, lora in enumerate(new):
    copied = sj.absorb(copied, [lora], task_ids=[f"n{i}"])
    before, donated = donated, sj.absorb(donated, [lora], task_ids=[f"n{i}"], donate=True)
    settles = held == 3 and i == FRAMES - 1
    assert all(g.coef.is_deleted() for g in before.groups.values()) != settles
  stored = lambda s: {g: grp.stored() for g, grp in s.groups.items()}  # noqa: E731
  chex.assert_trees_all_equal(stored(copied), stored(donated))
  assert sj.task_errors(copied) == sj.task_errors(donated)


def test_signs_are_deterministic_and_follow_svd_flip():
  pl = Planted(seed=6)
  loras = pl.loras(4)
  s1 = sj.init_subspace(pl.params, loras, k=4)
  s2 = sj.init_subspace(pl.params, loras, k=4)
  chex.assert_trees_all_equal(s1.groups, s2.groups)
  for grp in s1.groups.values():
    b = np.asarray(grp.basis)
    for row in range(b.shape[0]):
      cols = b[row, :, : int(grp.rank[row])]
      assert np.all(cols[np.abs(cols).argmax(axis=0), np.arange(cols.shape[1])] > 0)


@pytest.mark.parametrize("rows, frames", [(7, [0, 0, 1, 1, 1, 3, 3]), (10, [0] * 5 + [2] * 5)])
def test_frames_are_read_in_chunks_like_one_pass(monkeypatch, rows, frames):
  """Lazy coefficients are read one frame's run of rows at a time, in whole chunks and then
  smaller ones for the remainder (the last clamped back when it would run past capacity):
  current coefficients and the drift Grams equal a float64 per-task reference (X_f = β_f c,
  X = β M c, D = X_f − X); rows after the held ones stay zero, and frames no task uses are not
  read."""
  monkeypatch.setattr(frames_mod, "_CHUNK", 4)
  monkeypatch.setattr(frames_mod, "_MIN_CHUNK", 4)
  monkeypatch.setattr(frames_mod, "_TAIL", 2)  # whole chunks of 4, then remainders by 2
  rng = np.random.default_rng(rows)
  n, d, k, kc, t, p = 2, 9, 3, 4, 10, 2
  orth = lambda *s: np.linalg.qr(rng.standard_normal(s))[0]  # noqa: E731
  basis = np.stack([orth(d, k) for _ in range(n)])
  frame_basis = np.stack([np.stack([orth(d, kc) for _ in range(FRAMES)]) for _ in range(n)])
  maps = rng.standard_normal((n, FRAMES, k, kc))
  maps[:, 2] = 0.0  # a frame no task uses
  coef = rng.standard_normal((n, kc, t, p))
  coef[:, :, rows:] = 0.0
  frame = np.zeros(t, np.int32)
  frame[:rows] = frames
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  group = sj.FactorGroup(
    f32(basis),
    jnp.full((n,), k),
    f32(coef),
    jnp.ones((t, n), jnp.int32),
    f32(np.eye(k)[None]),
    f32(np.ones(n)),
    f32(np.zeros(n)),
    jnp.asarray(frame),
    f32(maps),
    tuple(f32(frame_basis[:, f]) for f in range(FRAMES)),
    f32(np.zeros((n, k))),
  )
  held = jnp.asarray(rows, jnp.int32)
  now = np.einsum("ltkj,ljtp->lktp", maps[:, frame], coef)
  np.testing.assert_allclose(np.asarray(frames_mod.current(group, held)), now, atol=1e-5)
  cells = [(s, i) for s in range(n) for i in range(t)]
  x_f = np.stack([frame_basis[s, frame[i]] @ coef[s, :, i] for s, i in cells])
  x = np.stack([basis[s] @ maps[s, frame[i]] @ coef[s, :, i] for s, i in cells])
  drift = x_f - x
  pairs = {"dd": (drift, drift), "xx": (x, x), "dx": (drift, x)}
  got = frames_mod.drift_grams(group, held)
  for name, (a, b) in pairs.items():
    want = np.einsum("idp,idq->ipq", a, b).reshape(n, t, p, p)
    want[:, rows:] = 0.0
    np.testing.assert_allclose(np.asarray(got[name]), want, atol=2e-5, err_msg=name)


@pytest.mark.parametrize(
  "m, in_span, zero_cols",
  [(8, False, 0), (8, True, 0), (8, False, 5), (6, True, 3), (90, False, 2), (90, True, 0)],
)
def test_small_space_is_orthonormal_and_holds_the_new_columns(m, in_span, zero_cols):
  """Q = [β, Q_x] orthonormal (zero columns only where β has them or X adds nothing), X = Q Y,
  for few columns (Gram–Schmidt) and many (Householder), new columns in β's span or not."""
  rng = np.random.default_rng(m + 7 * zero_cols + in_span)
  d, k = 64, 12
  basis = np.linalg.qr(rng.standard_normal((d, k)))[0]
  basis[:, k - zero_cols :] = 0.0  # inactive capacity columns
  cols = rng.standard_normal((d, m)) * np.geomspace(1, 1e-4, m)
  if in_span:
    cols = basis @ rng.standard_normal((k, m)) + 1e-9 * cols
  cols[:, -1] = 0.0  # a padding column
  q, y = (
    np.asarray(a, np.float64)
    for a in merge.small_space(jnp.asarray(basis, jnp.float32), jnp.asarray(cols, jnp.float32))
  )
  active = k - zero_cols  # Householder may put any direction in an inactive column
  np.testing.assert_allclose(q[:, :active], basis[:, :active], atol=1e-6)
  np.testing.assert_allclose(q @ y, cols, atol=2e-6 * np.linalg.norm(cols))
  norms = np.linalg.norm(q, axis=0)
  live = norms > 0.5
  assert np.all((norms < 1e-6) | live)  # columns are unit or zero
  gram = q[:, live].T @ q[:, live]
  np.testing.assert_allclose(gram, np.eye(live.sum()), atol=2e-6)


@pytest.mark.parametrize("center", [True, False])
def test_stored_scatter_matches_the_coefficients(center):
  pl = Planted(seed=13)
  sub = sj.init_subspace(pl.params, pl.loras(4), explained_variance=0.9, center=center)
  sub = sj.absorb(sub, pl.loras(3, rank=2), task_ids=["a", "b", "c"])
  for grp in sub.groups.values():
    s = np.asarray(grp.scatter, np.float64)
    coef = frames_mod.current(grp, sub.num_tasks)
    want = np.asarray(merge.scatter_factor(coef, grp.ncols, center=center), np.float64)
    for row in range(s.shape[0]):
      got_gram, want_gram = s[row] @ s[row].T, want[row] @ want[row].T
      np.testing.assert_allclose(got_gram, want_gram, atol=1e-4 * np.abs(want_gram).max())


def test_project_is_basis_transpose_times_factors():
  pl = Planted(seed=7)
  sub = sj.init_subspace(pl.params, pl.loras(5), k=4)
  lora = pl.lora_tree(2, alpha=4.0)
  coefs = sj.project(sub, lora)
  for (path, side), (g, row) in sub.layout.slots.items():
    u = np.asarray(sub.groups[g].basis[row], np.float64)
    want = u.T @ side_columns(sj.lora_leaves(lora)[path], side)
    np.testing.assert_allclose(np.asarray(coefs[g][row]), want, atol=1e-5)


def test_task_params_adds_delta_and_keeps_dtype_and_other_leaves():
  pl = Planted(seed=8)
  loras = pl.loras(3, alpha=2.0)
  sub = sj.init_subspace(pl.params, loras, explained_variance=1.0, center=False)
  params = jax.tree.map(lambda x: jnp.asarray(x + 1.0, jnp.bfloat16), pl.params)
  out = sj.task_params(params, sub, 2)
  assert jax.tree.structure(out) == jax.tree.structure(params)
  flat_in, flat_out = sj.paths.flatten_with_paths(params), sj.paths.flatten_with_paths(out)
  for path, w in flat_out.items():
    assert w.dtype == jnp.bfloat16
    if path in pl.shapes:
      delta = np.asarray(sj.lora_leaves(loras[2])[path].delta(), np.float64)
      got = np.asarray(w, np.float64) - np.asarray(flat_in[path], np.float64)
      np.testing.assert_allclose(got, delta, atol=0.05 * np.abs(delta).max())
    else:
      chex.assert_trees_all_equal(w, flat_in[path])


def test_bf16_loras_are_upcast():
  pl = Planted(seed=9)
  loras16 = [jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), t) for t in pl.loras(3)]
  sub = sj.init_subspace(pl.params, loras16, explained_variance=1.0, center=False)
  assert all(g.basis.dtype == jnp.float32 for g in sub.groups.values())
  rec = sj.lora_leaves(sj.reconstruct(sub, 1))
  for path, orig in sj.lora_leaves(loras16[1]).items():
    want = np.asarray(orig.a, np.float64) @ np.asarray(orig.b, np.float64)
    assert rel_err(rec[path].delta(), want) < 1e-5


def test_adding_tasks_does_not_recompile_merge_projection_or_apply(monkeypatch):
  pl = Planted(seed=10)
  sub = sj.init_subspace(pl.params, pl.loras(2), k=4, task_capacity=64)
  sub = sj.absorb(sub, pl.loras(1), task_ids=["warm"])  # first absorb: K becomes the fixed k
  chex.clear_trace_counter()
  n_groups = len(sub.groups)  # one compiled merge per group shape, then never again
  traced = jax.jit(
    chex.assert_max_traces(merge.merge_group.__wrapped__, n=n_groups),
    static_argnames=("k_out", "rule"),
  )
  monkeypatch.setattr(_driver, "merge_group", traced)
  apply_traced = jax.jit(
    chex.assert_max_traces(apply._task_params.__wrapped__, n=1), static_argnames=("layout",)
  )
  monkeypatch.setattr(apply, "_task_params", apply_traced)
  for t in range(2, 40):
    sub = sj.absorb(sub, pl.loras(1), task_ids=[f"t{t}"])
    sj.task_params(pl.params, sub, f"t{t}")
    sj.task_params(pl.params, sub, 0)
  assert sub.num_tasks == 41


def test_task_capacity_grows_in_power_of_two_buckets():
  pl = Planted(seed=11)
  sub = sj.init_subspace(pl.params, pl.loras(3), k=4)
  caps = set()
  for t in range(20):
    sub = sj.absorb(sub, pl.loras(1), task_ids=[f"t{t}"])
    caps.add(next(iter(sub.groups.values())).capacity[1])
  assert caps == {4, 8, 16, 32}  # 4 → 23 tasks: three doublings, no other size


def test_big_batches_pad_to_multiples_of_eight():
  """Batch rows: powers of two up to 16 (few compiles for small batches), then multiples of 8
  (a merge's small space, and its cubic SVD, grows with every padded row). Zero-padded rows are
  masked as for any batch (every absorb test pads m = 3 to 4)."""
  from share_jax._driver import batch_rows

  assert [batch_rows(m) for m in (1, 3, 16, 17, 20, 50, 64, 100)] == [1, 4, 16, 24, 24, 56, 64, 104]


def test_storage_counts_coefficients_bases_and_loras():
  pl = Planted(seed=12)
  sub = sj.init_subspace(pl.params, pl.loras(4, rank=3), k=5)
  sub = sub.with_head(0, {"w": jnp.zeros((24, 3)), "b": jnp.zeros(3)})
  st = sj.storage(sub)
  n_kernels = len(pl.shapes)
  assert st.coef_params[1] == n_kernels * 2 * 5 * 3
  assert st.lora_params[1] == sum((i + o) * 3 for i, o in pl.shapes.values())
  assert st.basis_params == sum((i + o) * 5 for i, o in pl.shapes.values())
  assert st.head_params == {0: 75, 1: 0, 2: 0, 3: 0}
  assert st.share_total == st.basis_params + 4 * n_kernels * 30 + 75
  assert st.ratio_per_task == pytest.approx(st.lora_params[1] / st.coef_params[1])
  vs_rank8 = sj.storage(sub, lora_rank=8)
  assert vs_rank8.lora_params[1] == sum((i + o) * 8 for i, o in pl.shapes.values())
