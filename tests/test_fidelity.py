"""Fidelity: what is reported (task errors, energy) is what is kept, against float64 truth."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy_reference import Planted, delta_error, side_columns, task_columns

import share_jax as sj
from share_jax import _driver, train
from share_jax.subspace import FRAMES, SIDES

SHAPES = {"m/a/kernel": (10, 6), "m/b/kernel": (10, 10)}
PROFILE = settings(
  max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def true_errors(sub, originals: dict) -> dict:
  """Relative ΔW error of every held task versus its original {path: LoRA} leaves."""
  return {
    t: delta_error(sj.lora_leaves(sj.reconstruct(sub, t)), originals[t]) for t in sub.task_ids
  }


def absorb_sequence(pl, batches, seed, **opts):
  """init on the first batch, absorb the rest; yields (subspace, originals, new ids) per step."""
  originals, sub = {}, None
  for step, n in enumerate(batches):
    loras = pl.loras(n, rank=2)
    ids = [f"s{step}t{i}" for i in range(n)]
    originals.update({t: sj.lora_leaves(x) for t, x in zip(ids, loras, strict=True)})
    if sub is None:
      sub = sj.init_subspace(pl.params, loras, task_ids=ids, **opts)
    else:
      sub = sj.absorb(sub, loras, task_ids=ids, **opts)
    yield sub, originals, ids


def test_lazy_frames_settle_and_still_bound_every_task():
  """Absorbing one task at a time opens a frame per merge; when the slots run out the stored
  tasks are settled into current coordinates. Through it every reported error stays an upper
  bound of the truth (one frame's drift measured on read, then folded in), and ``sj.settle``
  changes no read: reconstructions, bounds, nor (settling twice) anything."""
  pl = Planted(seed=5, shapes=SHAPES, hidden=3, noise=0.3)
  newest = []
  for sub, originals, _ in absorb_sequence(pl, [2] + [1] * FRAMES, 5, explained_variance=0.7):
    newest.append(int(jnp.max(next(iter(sub.groups.values())).frame[: sub.num_tasks])))
    reported, truth = sj.task_errors(sub), true_errors(sub, originals)
    for t in sub.task_ids:
      assert reported[t] >= truth[t] - 1e-5, (t, reported[t], truth[t])
  assert newest == [*range(FRAMES), 1]  # a frame per merge; settled when they ran out
  settled = sj.settle(sub)
  for t in sub.task_ids:
    before, after = (sj.lora_leaves(sj.reconstruct(s, t)) for s in (sub, settled))
    for path, lora in before.items():
      np.testing.assert_allclose(np.asarray(after[path].a), np.asarray(lora.a), atol=1e-5)
      np.testing.assert_allclose(np.asarray(after[path].b), np.asarray(lora.b), atol=1e-5)
  assert sj.task_errors(settled) == pytest.approx(sj.task_errors(sub), abs=1e-5)
  chex.assert_trees_all_equal(sj.settle(settled), settled)


def _run(batches, seed: int, check=None):
  """The last (subspace, originals) of ``absorb_sequence`` on a fresh ``Planted(seed)``, calling
  ``check(sub)`` after every step."""
  pl = Planted(seed=seed, shapes=SHAPES, hidden=3, noise=0.3)
  for step in absorb_sequence(pl, batches, 5, explained_variance=0.7):
    if check:
      check(step[0])
  return step[:2]


def test_young_frames_fold_alone_and_read_like_a_full_settle(monkeypatch):
  """When the frame slots run out while frame 0 holds more rows than the younger frames, only
  those are folded into one frame: frame 0's stored rows stay bit for bit. Reads equal those
  after settling everything instead, and every bound is above the truth and not above
  settling's (frame 0's tasks take one triangle step fewer)."""
  batches = [9] + [1] * (FRAMES + 2)
  newest, old = [], {}

  def check(sub):
    groups = sub.groups.items()
    newest.append(int(jnp.max(next(iter(sub.groups.values())).frame[: sub.num_tasks])))
    old.update({g: np.asarray(x.coef[:, :, :9]) for g, x in groups if g not in old})
    for g, x in groups:
      kc = old[g].shape[1]
      np.testing.assert_array_equal(np.asarray(x.coef[:, :kc, :9]), old[g])
      assert not np.any(np.asarray(x.coef[:, kc:, :9]))

  folded, originals = _run(batches, 8, check)
  assert newest == [*range(FRAMES), 2, 3, 4]  # frames 1…7 folded into 1 at the 8th absorb
  frame = np.asarray(next(iter(folded.groups.values())).frame[: folded.num_tasks])
  assert frame.tolist() == [0] * 9 + [1] * (FRAMES - 1) + [2, 3, 4]
  monkeypatch.setattr(_driver, "fold_from", lambda held: 0)  # settle everything instead
  settled, _ = _run(batches, 8)
  reported, truth, loose = (
    sj.task_errors(folded),
    true_errors(folded, originals),
    sj.task_errors(settled),
  )
  for t in folded.task_ids:
    assert truth[t] - 1e-5 <= reported[t] <= loose[t] + 1e-5, (t, truth[t], reported[t], loose[t])
    a, b = (sj.lora_leaves(sj.reconstruct(s, t)) for s in (folded, settled))
    for path, lora in a.items():
      np.testing.assert_allclose(np.asarray(b[path].a), np.asarray(lora.a), atol=1e-5)
      np.testing.assert_allclose(np.asarray(b[path].b), np.asarray(lora.b), atol=1e-5)


@pytest.mark.parametrize("center", [True, False])
def test_full_variance_keeps_every_task_exactly_through_absorbs(center):
  pl = Planted(seed=21, noise=0.3)
  for sub, originals, _ in absorb_sequence(
    pl, [1, 2, 1, 3], 0, explained_variance=1.0, center=center
  ):
    for t, err in true_errors(sub, originals).items():
      assert err <= 1e-5, (t, err)
    assert max(sj.task_errors(sub).values()) <= 1e-5
    for grp in sub.groups.values():
      np.testing.assert_allclose(np.asarray(grp.energy), 1.0, atol=1e-5)


@pytest.mark.parametrize("center", [True, False])
def test_full_variance_finish_task_keeps_the_trained_factors_and_old_tasks(center):
  pl = Planted(seed=22)
  loras = pl.loras(3, rank=2)
  sub = sj.init_subspace(pl.params, loras, explained_variance=1.0, center=center)
  state = sj.begin_task(sub, "new", rng=jax.random.key(0), p=2, phi=2)
  state = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape), state)
  trained = {
    g: np.asarray(f, np.float64) for g, f in train.trained_factors(sub.bases, state).items()
  }
  merged = sj.finish_task(sub, state, "new")
  for t, lora in enumerate(loras):
    assert delta_error(sj.lora_leaves(sj.reconstruct(merged, t)), sj.lora_leaves(lora)) <= 1e-5
  rec = sj.lora_leaves(sj.reconstruct(merged, "new"))
  num = den = 0.0
  for spec in sub.layout.kernels:
    (ga, ra), (gb, rb) = (sub.layout.slots[(spec.path, s)] for s in SIDES)
    want = trained[ga][ra] @ trained[gb][rb].T
    num += np.sum((np.asarray(rec[spec.path].delta(), np.float64) - want) ** 2)
    den += np.sum(want**2)
  assert np.sqrt(num / den) <= 1e-5
  assert max(sj.task_errors(merged).values()) <= 1e-5


@pytest.mark.parametrize("center", [True, False])
def test_energy_is_the_fraction_of_the_stack_that_is_stored(center):
  pl = Planted(seed=23, noise=0.2)
  loras = pl.loras(5, rank=2)
  sub = sj.init_subspace(pl.params, loras, k=3, center=center)
  for (path, side), (g, row) in sub.layout.slots.items():
    orig = [side_columns(sj.lora_leaves(x)[path], side) for x in loras]
    kept = [task_columns(sub, t, path, side) for t in sub.task_ids]
    want = sum(np.sum(x**2) for x in kept) / sum(np.sum(x**2) for x in orig)
    assert float(sub.groups[g].energy[row]) == pytest.approx(want, rel=1e-4)


@PROFILE
@given(
  seed=st.integers(0, 2**16),
  batches=st.lists(st.integers(1, 2), min_size=1, max_size=3),
  rule=st.sampled_from(
    [("k", 1), ("k", 3), ("explained_variance", 0.5), ("explained_variance", 0.9)]
  ),
  center=st.booleans(),
)
def test_task_errors_are_exact_when_stored_and_never_under_report(seed, batches, rule, center):
  pl = Planted(seed=seed, shapes=SHAPES, hidden=3, noise=0.3)
  opts = {rule[0]: rule[1], "center": center}
  for sub, originals, new_ids in absorb_sequence(pl, batches, seed, **opts):
    reported, truth = sj.task_errors(sub), true_errors(sub, originals)
    for t in sub.task_ids:
      assert reported[t] >= truth[t] - 1e-5, (t, reported[t], truth[t])
    for t in new_ids:
      assert reported[t] == pytest.approx(truth[t], abs=1e-5, rel=1e-4)


@PROFILE
@given(
  seed=st.integers(0, 2**16),
  batches=st.lists(st.integers(1, 2), min_size=1, max_size=3),
  tau=st.sampled_from([0.0, 0.05, 0.2, 0.5]),
  center=st.booleans(),
)
def test_max_task_error_holds_for_every_task(seed, batches, tau, center):
  pl = Planted(seed=seed, shapes=SHAPES, hidden=3, noise=0.3)
  for sub, originals, _ in absorb_sequence(pl, batches, seed, max_task_error=tau, center=center):
    reported = sj.task_errors(sub)
    for t, err in true_errors(sub, originals).items():
      assert err <= tau + 1e-5 and reported[t] <= tau + 1e-5, (t, err, reported[t])


def test_max_task_error_compresses_more_as_the_bound_loosens():
  pl = Planted(seed=24, noise=0.05)
  loras = pl.loras(6, rank=3)
  ks = [
    sum(sj.init_subspace(pl.params, loras, max_task_error=tau).ranks().values())
    for tau in (0.0, 0.1, 0.3, 0.6)
  ]  # one compile: K capacity stays 8
  full = sum(sj.init_subspace(pl.params, loras, explained_variance=1.0).ranks().values())
  assert ks[0] == full and ks == sorted(ks, reverse=True) and ks[-1] < ks[1] < full


def test_a_merge_over_the_threshold_warns_or_raises_naming_the_tasks():
  pl = Planted(seed=25, noise=0.5)
  sub = sj.init_subspace(pl.params, pl.loras(3), explained_variance=1.0, max_task_error=0.01)
  with pytest.warns(sj.FidelityWarning, match=r"max_task_error=0.01 under k=1.*'x'"):
    sj.absorb(sub, pl.loras(1), task_ids=["x"], k=1)
  strict = sj.init_subspace(
    pl.params,
    pl.loras(3),
    config=sj.SubspaceConfig(explained_variance=1.0, max_task_error=0.01, strict=True),
  )
  errors = sj.task_errors(strict)
  for donate in (False, True):  # a strict check never consumes the argument
    with pytest.raises(sj.FidelityError, match="exceed max_task_error"):
      sj.absorb(strict, pl.loras(1), task_ids=["x"], k=1, donate=donate)
    assert strict.task_ids == (0, 1, 2)
    assert sj.task_errors(strict) == errors
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    sj.absorb(sub, pl.loras(1), task_ids=["y"])  # explained variance 1: nothing lost


def test_config_object_and_keywords_are_one_path():
  pl = Planted(seed=26)
  loras = pl.loras(4)
  by_config = sj.init_subspace(pl.params, loras, config=sj.SubspaceConfig(k=3, center=False))
  by_keyword = sj.init_subspace(pl.params, loras, k=3, center=False)
  chex.assert_trees_all_equal(by_config.groups, by_keyword.groups)
  assert by_config.config == by_keyword.config
  with pytest.warns(sj.FidelityWarning):  # tasks stored at k=3 are already above 0.1
    tau = sj.absorb(by_config, pl.loras(1), task_ids=["t"], max_task_error=0.1)
  assert tau.config.rule == ("max_task_error", 0.1) and tau.config.center is False
  empty = sj.empty_subspace(pl.params, "kernel", config=sj.SubspaceConfig(k=2), max_k=1)
  assert (empty.config.k, empty.config.max_k) == (2, 1)
  with pytest.raises(sj.ShareError, match="unknown options"):
    sj.init_subspace(pl.params, loras, kk=3)
  with pytest.raises(sj.ShareError, match="must be a SubspaceConfig"):
    sj.init_subspace(pl.params, loras, config={"k": 3})


def test_user_jit_over_the_subspace_compiles_once_across_absorb_finish_and_set_task():
  pl = Planted(seed=27)
  sub = sj.init_subspace(pl.params, pl.loras(2), k=4, task_capacity=16)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def total(s):
    return sum(jnp.sum(g.coef) for g in s.groups.values()) + jnp.sum(s.tasks.norm)

  total(sub)
  for i in range(3):
    sub = sj.absorb(sub, pl.loras(1), task_ids=[f"a{i}"])
    total(sub)
  state = sj.begin_task(sub, "trained", rng=jax.random.key(0), p=3, phi=0)
  sub = sj.finish_task(sub, state, "trained")
  total(sub)
  sub = sj.set_task(sub, "trained", sj.task_state(sub, "trained"))
  total(sub)
  assert sub.task_ids == (0, 1, "a0", "a1", "a2", "trained")


def test_task_ids_are_refused_inside_jit():
  pl = Planted(seed=28)
  sub = sj.init_subspace(pl.params, pl.loras(2), k=2)
  with pytest.raises(sj.ShareError, match="outside jax.jit"):
    jax.jit(lambda s: s.coefs(1))(sub)
