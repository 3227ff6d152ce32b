"""Hypothesis property tests of merge invariants (deterministic profile, few shapes)."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy_reference import Planted, active_basis, projector_distance, rel_err, task_columns

import share_jax as sj
from share_jax.subspace import SIDES

SHAPES = {"m/a/kernel": (10, 6), "m/b/kernel": (10, 10)}
PROFILE = settings(
  max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def planted(seed, n, rank, noise):
  pl = Planted(seed=seed, shapes=SHAPES, hidden=3, noise=noise)
  return pl, pl.loras(n, rank=rank)


@PROFILE
@given(
  seed=st.integers(0, 2**16),
  n_a=st.integers(1, 3),
  n_b=st.integers(1, 3),
  rank=st.sampled_from([1, 2]),
  noise=st.sampled_from([0.0, 0.1]),
)
def test_absorbing_b_after_a_spans_init_of_a_union_b(seed, n_a, n_b, rank, noise):
  pl, loras = planted(seed, n_a + n_b, rank, noise)
  opts = dict(explained_variance=1.0, center=False)
  seq = sj.absorb(
    sj.init_subspace(pl.params, loras[:n_a], **opts),
    loras[n_a:],
    task_ids=list(range(n_a, n_a + n_b)),
  )
  joint = sj.init_subspace(pl.params, loras, **opts)
  assert seq.ranks() == joint.ranks()
  for path in SHAPES:
    for side in SIDES:
      for t in joint.task_ids:
        assert rel_err(task_columns(seq, t, path, side), task_columns(joint, t, path, side)) < 1e-4
      assert (
        projector_distance(active_basis(seq, path, side), active_basis(joint, path, side)) < 1e-3
      )


@PROFILE
@given(
  seed=st.integers(0, 2**16),
  n_old=st.integers(2, 4),
  k=st.integers(1, 4),
  rank=st.sampled_from([1, 2, 3]),
)
def test_old_task_error_after_a_merge_is_the_discarded_energy(seed, n_old, k, rank):
  pl, loras = planted(seed, n_old + 1, rank, 0.2)
  sub = sj.init_subspace(pl.params, loras[:n_old], explained_variance=1.0, center=False)
  merged = sj.absorb(sub, loras[n_old:], task_ids=["new"], k=k)
  for path in SHAPES:
    for side in SIDES:
      g, row = merged.layout.slots[(path, side)]
      before = [task_columns(sub, t, path, side) for t in sub.task_ids]
      new = task_columns(
        sj.init_subspace(pl.params, loras[n_old:], explained_variance=1.0, center=False),
        0,
        path,
        side,
      )
      total = sum(float(np.sum(x**2)) for x in before + [new])
      discarded = (1.0 - float(merged.groups[g].energy[row])) * total
      err = sum(
        float(np.sum((task_columns(merged, t, path, side) - x) ** 2))
        for t, x in zip(merged.task_ids, before + [new], strict=True)
      )
      assert err <= discarded * (1 + 1e-3) + 1e-5 * total
      assert err >= discarded * (1 - 1e-3) - 1e-5 * total  # projections lose exactly that


@PROFILE
@given(seed=st.integers(0, 2**16), n=st.integers(1, 4), ev=st.sampled_from([0.5, 0.8, 1.0]))
def test_projecting_a_reconstruction_gives_back_its_coefficients(seed, n, ev):
  pl, loras = planted(seed, n, 2, 0.1)
  sub = sj.init_subspace(pl.params, loras, explained_variance=ev)
  for t in sub.task_ids:
    again = sj.project(sub, sj.reconstruct(sub, t))
    for g, c in sub.coefs(t).items():
      p = again[g].shape[-1]
      np.testing.assert_allclose(np.asarray(again[g]), np.asarray(c)[..., :p], atol=1e-5)
