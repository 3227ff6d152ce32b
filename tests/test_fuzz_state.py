"""Fuzz cases (issue 8 §2) on the in-memory state: NaN/Inf on every write path, stale training
states, and inputs that used to raise raw Python errors. Each asserts a ShareError naming the
task / group / path, and that nothing changed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpy_reference import Planted, rel_err

import share_jax as sj
from share_jax.paths import nest


@pytest.fixture(scope="module")
def planted():
  pl = Planted(seed=11)
  return pl, sj.init_subspace(pl.params, pl.loras(2), k=3)


def arrays(sub: sj.Subspace) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(sub)]


def assert_unchanged(sub: sj.Subspace, before: list[np.ndarray]) -> None:
  for x, y in zip(arrays(sub), before, strict=True):
    np.testing.assert_array_equal(x, y)


def poisoned(tree, value=np.nan):
  """``tree`` with one entry of its first leaf set to ``value``."""
  leaves, treedef = jax.tree.flatten(tree)
  leaves[0] = jnp.asarray(leaves[0]).reshape(-1).at[0].set(value).reshape(leaves[0].shape)
  return jax.tree.unflatten(treedef, leaves)


# ----------------------------------------------------------------------------- NaN / Inf writes


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("part", ["coef", "temp", "temp_coef"])
def test_finish_task_refuses_non_finite_state(planted, part, value):
  _, sub = planted
  state = sj.begin_task(sub, "new", rng=jax.random.key(0), p=2, phi=2)
  group = sorted(getattr(state, part))[-1]
  bad = state.replace(
    **{part: {**getattr(state, part), group: poisoned(getattr(state, part)[group], value)}}
  )
  before = arrays(sub)
  with pytest.raises(sj.ShareError, match=f"task 'new': .* of group {group} contain NaN or Inf"):
    sj.finish_task(sub, bad, "new")
  assert_unchanged(sub, before)


def test_set_task_refuses_non_finite_coefficients_and_heads(planted):
  _, sub = planted
  state = sj.task_state(sub, 1)
  group = sorted(state.coef)[0]
  before = arrays(sub)
  with pytest.raises(sj.ShareError, match=f"task 1: coefficients of group {group} contain NaN"):
    sj.set_task(sub, 1, state.replace(coef={**state.coef, group: poisoned(state.coef[group])}))
  head = {"out": {"kernel": jnp.ones((4, 2)).at[1, 1].set(jnp.inf)}}
  with pytest.raises(sj.ShareError, match=r"task 1: head at 'out/kernel' contains NaN or Inf"):
    sj.set_task(sub, 1, state.replace(head=head))
  assert_unchanged(sub, before)
  assert sub.heads == {}


def test_heads_with_nan_are_refused_on_every_path(planted):
  _, sub = planted
  head = {"w": jnp.full((3,), jnp.nan)}
  with pytest.raises(sj.ShareError, match=r"task 0: head at 'w' contains NaN"):
    sub.with_head(0, head)
  with pytest.raises(sj.ShareError, match=r"task 'h': head at 'w' contains NaN"):
    sj.begin_task(sub, "h", rng=jax.random.key(0), head=head)
  state = sj.begin_task(sub, "h", rng=jax.random.key(0))
  with pytest.raises(sj.ShareError, match=r"task 'h': head at 'w' contains NaN"):
    sj.finish_task(sub, state.replace(head=head), "h")
  assert sub.heads == {} and sub.task_ids == (0, 1)


def test_nan_lora_is_refused_by_init_and_absorb(planted):
  pl, sub = planted
  leaves = dict(sj.lora_leaves(pl.lora_tree(2)))
  path = "enc/l1/query/kernel"
  leaves[path] = sj.LoRA(np.full((24, 2), np.nan, np.float32), np.ones((2, 16), np.float32))
  for call in (
    lambda: sj.init_subspace(pl.params, [nest(leaves)], task_ids=["x"]),
    lambda: sj.absorb(sub, [nest(leaves)], task_ids=["x"]),
  ):
    with pytest.raises(sj.ShareError, match=f"task 'x', '{path}': LoRA factors contain NaN"):
      call()


# ----------------------------------------------------------------------------- stale states


def regression(seed=0, d_in=12, d_out=10, n=128):
  rng = np.random.default_rng(seed)
  w0 = rng.normal(size=(d_in, d_out)).astype(np.float32) / 4
  target = (rng.normal(size=(d_in, 2)) @ rng.normal(size=(2, d_out))).astype(np.float32)
  x = rng.normal(size=(n, d_in)).astype(np.float32)
  return {"dense": {"kernel": jnp.asarray(w0)}}, (jnp.asarray(x), jnp.asarray(x @ (w0 + target)))


def mse(params, head, batch):
  x, y = batch
  return jnp.mean((x @ params["dense"]["kernel"] - y) ** 2)


def trained(sub, params, batch, task_id, steps=40):
  state = sj.begin_task(sub, task_id, rng=jax.random.key(1), p=2, phi=2)
  opt = optax.adam(3e-2)
  opt_state, step = opt.init(state), sj.make_train_step(mse, opt, sub.layout)
  for _ in range(steps):
    state, opt_state, _ = step(state, opt_state, params, sub.bases, batch)
  return state


def delta(lora_tree) -> np.ndarray:
  return np.asarray(sj.lora_leaves(lora_tree)["dense/kernel"].delta())


def test_state_begun_before_a_merge_is_merged_exactly_as_trained():
  """Task "late" trains on the bases of ``sub0``; task "other" is absorbed meanwhile. The merge
  stores the ΔW "late" was trained to (on sub0's bases), not that of its coefficients on the new
  bases."""
  params, batch = regression()
  rng = np.random.default_rng(0)
  first = {"dense": {"kernel": sj.LoRA(rng.normal(size=(12, 2)), rng.normal(size=(2, 10)))}}
  other = {"dense": {"kernel": sj.LoRA(rng.normal(size=(12, 3)), rng.normal(size=(3, 10)))}}
  # uncentred with every direction kept: a merge stores each task exactly
  sub0 = sj.init_subspace(params, [first], task_ids=["first"], explained_variance=1.0, center=False)
  state = trained(sub0, params, batch, "late")
  f = sj.train.trained_factors(sub0.bases, state)
  truth = {}
  for (_, side), (g, row) in sub0.layout.slots.items():
    truth[side] = np.asarray(f[g][row])
  want = truth["a"] @ truth["b"].T
  sub1 = sj.absorb(sub0, [other], task_ids=["other"])
  merged = sj.finish_task(sub1, state, "late")
  assert rel_err(delta(sj.reconstruct(merged, "late")), want) < 1e-4
  assert rel_err(delta(sj.reconstruct(merged, "other")), delta(other)) < 1e-4
  # what the merge did before states knew their bases: off by far more than float error
  naive = sj.finish_task(sub1, state.replace(origin=None), "late")
  assert rel_err(delta(sj.reconstruct(naive, "late")), want) > 1e-2


def test_set_task_refuses_a_state_read_before_a_merge():
  params, batch = regression(seed=1)
  rng = np.random.default_rng(1)

  def lora(r):
    return {"dense": {"kernel": sj.LoRA(rng.normal(size=(12, r)), rng.normal(size=(r, 10)))}}

  sub0 = sj.init_subspace(params, [lora(2)], task_ids=["a"], k=3)
  state = sj.task_state(sub0, "a")
  sub1 = sj.absorb(sub0, [lora(2)], task_ids=["b"])
  before = arrays(sub1)
  with pytest.raises(
    sj.ShareError, match="task 'a': the state was read on bases that a later merge"
  ):
    sj.set_task(sub1, "a", state)
  assert_unchanged(sub1, before)
  # the same state on its own bases, or re-read after the merge, is accepted
  sj.set_task(sub0, "a", state)
  sj.set_task(sub1, "a", sj.task_state(sub1, "a"))
  # a state whose bases equal the subspace's by value (e.g. after a checkpoint restore) too
  copied = sub0.replace(groups=jax.tree.map(jnp.array, sub0.groups))
  sj.set_task(copied, "a", state)


def test_origin_survives_the_train_step_without_retracing(planted):
  params, batch = regression(seed=2)
  sub = sj.empty_subspace(params, r"kernel$", k=2)
  state = trained(sub, params, batch, 0, steps=2)
  assert state.origin is not None and state.origin.bases["d12"] is sub.bases["d12"]


# ----------------------------------------------------------------------------- raw errors


def test_bool_k_is_refused(planted):
  pl, _ = planted
  with pytest.raises(sj.ShareError, match="k must be an integer >= 1, got True"):
    sj.init_subspace(pl.params, pl.loras(1), k=True)


@pytest.mark.parametrize(
  "a, b, message",
  [
    ("abc", np.ones((2, 16)), "factor a is a str, not an array"),
    (np.ones((24, 2)), [[1.0] * 16] * 2, "factor b is a list, not an array"),
    (np.ones((24, 2), np.int32), np.ones((2, 16)), "factor a has dtype int32"),
    (np.ones((24, 2), bool), np.ones((2, 16)), "factor a has dtype bool"),
    (np.ones((24, 0)), np.ones((0, 16)), r"LoRA of rank 0"),
  ],
)
def test_bad_factors_name_task_and_path(planted, a, b, message):
  pl, sub = planted
  leaves = dict(sj.lora_leaves(pl.lora_tree(2)))
  path = "enc/l0/query/kernel"
  leaves[path] = sj.LoRA(a, b, alpha=4.0)
  before = arrays(sub)
  with pytest.raises(sj.ShareError, match=f"task 'x', '{path}': {message}"):
    sj.absorb(sub, [nest(leaves)], task_ids=["x"])
  assert_unchanged(sub, before)
  with pytest.raises(sj.ShareError, match=f"task 0, '{path}': {message}"):
    sj.init_subspace(pl.params, [nest(leaves)])


def test_rank_zero_lora_scale_is_a_share_error():
  with pytest.raises(sj.ShareError, match="rank 0"):
    _ = sj.LoRA(np.ones((3, 0)), np.ones((0, 2)), alpha=8.0).scale


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(p=1.5), "p must be an integer >= 1, got 1.5"),
    (dict(p=0), "p must be an integer >= 1, got 0"),
    (dict(phi=True), "phi must be an integer >= 0, got True"),
    (dict(scale=float("nan")), "scale must be a finite number > 0, got nan"),
    (dict(scale=-1.0), "scale must be a finite number > 0"),
  ],
)
def test_begin_task_arguments(planted, kwargs, message):
  _, sub = planted
  with pytest.raises(sj.ShareError, match=f"begin_task 'n': {message}"):
    sj.begin_task(sub, "n", rng=jax.random.key(0), **kwargs)
  sj.begin_task(sub, "n", rng=jax.random.key(0), p=np.int64(2), scale=np.float32(0.1))  # fine


def test_integer_kernels_are_refused(planted):
  pl, sub = planted
  params = jax.tree.map(lambda x: np.zeros(x.shape, np.int32), pl.params)
  with pytest.raises(sj.ShareError, match="kernel 'enc/l0/query/kernel' has dtype int32"):
    sj.init_subspace(params, pl.loras(1))
  with pytest.raises(sj.ShareError, match="kernel 'enc/l0/query/kernel' has dtype int32"):
    sj.empty_subspace(params, "kernel")
  with pytest.raises(sj.ShareError, match="kernel 'enc/l0/query/kernel' has dtype int32: W"):
    sj.task_params(params, sub, 0)
  with pytest.raises(sj.ShareError, match="has dtype int32: W"):
    sj.apply_lora(params, pl.lora_tree(2))


def test_more_raw_errors_are_share_errors(planted):
  pl, sub = planted
  for rng in (None, 3):
    with pytest.raises(sj.ShareError, match="begin_task 'n': rng must be a PRNG key"):
      sj.begin_task(sub, "n", rng=rng)
  with pytest.raises(sj.ShareError, match=r"task id 1.5 must be a str or an int"):
    sj.begin_task(sub, 1.5, rng=jax.random.key(0))
  state = sj.begin_task(sub, "n", rng=jax.random.key(0))
  with pytest.raises(sj.ShareError, match=r"task id \['x'\] must be a str or an int"):
    sj.finish_task(sub, state, ["x"])
  bad = {"enc": {"l0": {"query": {"kernel": sj.LoRA("a", np.ones((2, 16)))}}}}
  with pytest.raises(sj.ShareError, match=r"LoRA at 'enc/l0/query/kernel': factor a is a str"):
    sj.apply_lora(pl.params, bad)
  with pytest.raises(sj.ShareError, match="target must be a regex string or a predicate, got None"):
    sj.empty_subspace(pl.params, None)
  assert sub.task_ids == (0, 1)
