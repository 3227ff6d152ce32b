"""Mixed-task batches through the factored path equal each example run on its own task_params."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import share_jax as sj
from share_jax.experiments.models import BertEncoder, ViT, ViTConfig, tiny_config
from share_jax.experiments.synthetic import random_loras
from share_jax.serving import mixed_task_apply, task_indices

TASKS = ["t0", "t1", "t2", 3, 4]
ORDER = ["t2", 4, "t0", "t2", 3, "t1"]  # one batch, every example its own task


def bert_case():
  model = BertEncoder(tiny_config())
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, 128, size=(len(ORDER), 10)), jnp.int32)
  mask = jnp.asarray(np.arange(10)[None, :] < rng.integers(4, 11, size=(len(ORDER), 1)), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), ids, mask)
  return model, params, r"(query|value|intermediate)/kernel$", (ids, mask)


def vit_case():
  model = ViT(ViTConfig.tiny())
  images = jnp.asarray(np.random.default_rng(1).uniform(size=(len(ORDER), 28, 28)), jnp.float32)
  params = jax.jit(model.init)(jax.random.key(1), images)
  return model, params, r"(query|value|output)/kernel$", (images,)


@functools.cache
def case(name):
  model, params, target, inputs = {"bert": bert_case, "vit": vit_case}[name]()
  loras = random_loras(params, target, len(TASKS), rank=3, seed=2, b_scale=0.5)
  sub = sj.init_subspace(params, loras, task_ids=TASKS, k=6)
  return model, params, sub, inputs


def per_example(model, params, sub, inputs):
  apply = jax.jit(model.apply)
  rows = [
    apply(sj.task_params(params, sub, t), *(x[i : i + 1] for x in inputs))
    for i, t in enumerate(ORDER)
  ]
  return np.concatenate(rows)


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_mixed_batch_equals_each_example_with_its_task_params(name):
  model, params, sub, inputs = case(name)
  serve = jax.jit(functools.partial(mixed_task_apply, model.apply))
  tasks = task_indices(sub, ORDER)
  got = serve(params, sub, tasks, *inputs)
  np.testing.assert_allclose(got, per_example(model, params, sub, inputs), atol=1e-5, rtol=1e-5)
  one_task = serve(params, sub, jnp.zeros_like(tasks), *inputs)
  assert np.abs(got - one_task).max() > 1e-2  # each example's own task really matters


def test_prefix_for_a_subspace_built_on_the_bare_params_tree():
  model, params, _, inputs = case("vit")
  target = r"(query|value)/kernel$"
  sub = sj.init_subspace(
    params["params"], random_loras(params["params"], target, 3, rank=2, seed=3, b_scale=0.5), k=4
  )
  tasks = jnp.asarray([2, 0, 1, 1, 0, 2], jnp.int32)
  got = mixed_task_apply(model.apply, params, sub, tasks, *inputs, prefix="")
  apply = jax.jit(model.apply)
  want = [
    apply({"params": sj.task_params(params["params"], sub, int(t))}, inputs[0][i : i + 1])
    for i, t in enumerate(tasks)
  ]
  np.testing.assert_allclose(got, np.concatenate(want), atol=1e-5, rtol=1e-5)


def test_errors_name_the_problem():
  model, params, sub, inputs = case("vit")
  tasks = task_indices(sub, ORDER)
  with pytest.raises(sj.ShareError, match=r"no nn.Dense was called .*params/layer_0"):
    mixed_task_apply(model.apply, params, sub, tasks, *inputs, prefix="backbone/")
  with pytest.raises(sj.ShareError, match="do not lead with the batch of tasks"):
    mixed_task_apply(model.apply, params, sub, tasks[:2], *inputs)
  with pytest.raises(sj.UnknownTaskError, match="'nope'"):
    task_indices(sub, ["t0", "nope"])
