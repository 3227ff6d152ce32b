"""Bad input: typed errors that name the offending path or task, and no partial state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_reference import Planted

import share_jax as sj
from share_jax.paths import nest


@pytest.fixture(scope="module")
def planted():
  pl = Planted(seed=0)
  return pl, sj.init_subspace(pl.params, pl.loras(3), k=3)


def with_leaf(tree, path, leaf):
  leaves = dict(sj.lora_leaves(tree))
  leaves[path] = leaf
  return nest(leaves)


def test_empty_list(planted):
  pl, sub = planted
  with pytest.raises(sj.ShareError, match="no LoRAs"):
    sj.init_subspace(pl.params, [])
  with pytest.raises(sj.ShareError, match="no LoRAs"):
    sj.absorb(sub, [], task_ids=[])


def test_lora_at_a_path_the_params_lack(planted):
  pl, _ = planted
  bad = with_leaf(
    pl.lora_tree(2), "enc/l9/query/kernel", sj.LoRA(np.ones((24, 2)), np.ones((2, 16)))
  )
  with pytest.raises(sj.ShareError, match="enc/l9/query/kernel"):
    sj.init_subspace(pl.params, [bad])


def test_factor_shapes_that_do_not_fit_the_kernel(planted):
  pl, sub = planted
  path = "enc/l0/query/kernel"
  wrong_out = with_leaf(pl.lora_tree(2), path, sj.LoRA(np.ones((24, 2)), np.ones((2, 17))))
  with pytest.raises(sj.ShareError, match=f"task 0, '{path}'.*kernel is \\(24, 16\\)"):
    sj.init_subspace(pl.params, [wrong_out])
  mismatched_rank = with_leaf(pl.lora_tree(2), path, sj.LoRA(np.ones((24, 2)), np.ones((3, 16))))
  with pytest.raises(sj.ShareError, match="'new'.*not \\(d_in, r\\), \\(r, d_out\\)"):
    sj.absorb(sub, [mismatched_rank], task_ids=["new"])


def test_trees_that_adapt_different_kernels(planted):
  pl, sub = planted
  leaves = dict(sj.lora_leaves(pl.lora_tree(2)))
  del leaves["enc/l1/query/kernel"]
  with pytest.raises(sj.ShareError, match="task 1 adapts a different set.*missing.*enc/l1/query"):
    sj.init_subspace(pl.params, [pl.lora_tree(2), nest(leaves)])
  with pytest.raises(sj.ShareError, match="task 'x' adapts a different set"):
    sj.absorb(sub, [nest(leaves)], task_ids=["x"])


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf_in_a_factor(planted, value):
  pl, sub = planted
  a = np.ones((24, 2))
  a[3, 1] = value
  bad = with_leaf(pl.lora_tree(2), "enc/l0/value/kernel", sj.LoRA(a, np.ones((2, 24))))
  with pytest.raises(sj.ShareError, match="task 'bad', 'enc/l0/value/kernel'.*NaN or Inf"):
    sj.absorb(sub, [bad], task_ids=["bad"])


def test_unknown_task_id(planted):
  pl, sub = planted
  for fn in (lambda: sj.reconstruct(sub, "nope"), lambda: sj.task_params(pl.params, sub, "nope")):
    with pytest.raises(KeyError, match="unknown task id 'nope'"):
      fn()
  with pytest.raises(sj.UnknownTaskError):
    sub.coefs(99)


def test_duplicate_task_ids(planted):
  pl, sub = planted
  with pytest.raises(sj.ShareError, match="duplicate task id 'a'"):
    sj.init_subspace(pl.params, pl.loras(2), task_ids=["a", "a"])
  with pytest.raises(sj.ShareError, match="duplicate task id 1: the subspace already holds it"):
    sj.absorb(sub, pl.loras(1), task_ids=[1])
  with pytest.raises(sj.ShareError, match="duplicate task id 2"):
    sj.begin_task(sub, 2, rng=jax.random.key(0))


@pytest.mark.parametrize("ev", [0.0, -0.1, 1.01, float("nan")])
def test_explained_variance_outside_unit_interval(planted, ev):
  pl, sub = planted
  with pytest.raises(sj.ShareError, match="explained_variance must be in \\(0, 1\\]"):
    sj.init_subspace(pl.params, pl.loras(1), explained_variance=ev)
  with pytest.raises(sj.ShareError, match="explained_variance"):
    sj.absorb(sub, pl.loras(1), task_ids=["n"], explained_variance=ev)


@pytest.mark.parametrize("name", ["k", "max_k"])
def test_k_or_max_k_below_one(planted, name):
  pl, _ = planted
  with pytest.raises(sj.ShareError, match=f"{name} must be an integer >= 1"):
    sj.init_subspace(pl.params, pl.loras(1), **{name: 0})


def test_params_that_do_not_fit_the_subspace(planted):
  pl, sub = planted
  params = jax.tree.map(jnp.asarray, pl.params)
  params["enc"]["l0"]["query"]["kernel"] = jnp.zeros((24, 15))
  with pytest.raises(sj.ShareError, match="'enc/l0/query/kernel' has shape \\(24, 15\\)"):
    sj.task_params(params, sub, 0)
  params["enc"]["l0"]["query"]["kernel"] = jnp.zeros((24, 16))
  del params["enc"]["l1"]
  with pytest.raises(sj.ShareError, match="no kernel at 'enc/l1/query/kernel'"):
    sj.task_params(params, sub, 0)


def test_failed_absorb_leaves_the_subspace_usable(planted):
  pl, sub = planted
  a = np.full((24, 2), np.nan)
  with pytest.raises(sj.ShareError):
    sj.absorb(
      sub,
      [
        pl.lora_tree(2),
        with_leaf(pl.lora_tree(2), "enc/l0/value/kernel", sj.LoRA(a, np.ones((2, 24)))),
      ],
      task_ids=["p", "q"],
    )
  assert sub.task_ids == (0, 1, 2)
  assert sj.absorb(sub, pl.loras(1), task_ids=["p"]).task_ids == (0, 1, 2, "p")


def test_target_selecting_nothing():
  pl = Planted(seed=1)
  with pytest.raises(sj.ShareError, match="target 'nothing_here' selects no 2-D kernel"):
    sj.empty_subspace(pl.params, "nothing_here")


def test_groups_with_stale_frames_are_refused(planted):
  """A group whose coefficients were replaced (more task rows) but whose frames were kept is
  refused by name; built from ``stored()`` it gets fresh frames."""
  _, sub = planted

  def grown(grp):
    return grp.replace(
      coef=jnp.pad(grp.coef, ((0, 0), (0, 0), (0, 4), (0, 0))),
      ncols=jnp.pad(grp.ncols, ((0, 4), (0, 0))),
    )

  stale = {g: grown(grp) for g, grp in sub.groups.items()}
  with pytest.raises(sj.ShareError, match="group d.*: its frames do not fit"):
    sj.Subspace.create(stale, sub.layout, sub.task_ids, sub.config)
  rebuilt = {g: grown(grp.stored()) for g, grp in sub.groups.items()}
  fresh = sj.Subspace.create(rebuilt, sub.layout, sub.task_ids, sub.config)
  for g, c in sub.coefs(0).items():
    np.testing.assert_allclose(fresh.coefs(0)[g], c, atol=1e-6)
