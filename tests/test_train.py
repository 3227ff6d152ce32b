"""Training in the subspace: zero-ΔW start, ε-only gradients, merges that keep what was learned."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from numpy_reference import Planted, rel_err

import share_jax as sj
from share_jax import merge, train
from share_jax.lora import select_kernels
from share_jax.paths import flatten_with_paths, nest


def regression_problem(seed=0, d_in=12, d_out=10, n=256):
  """A linear layer W0 and data whose best update has low rank (mostly outside any basis)."""
  rng = np.random.default_rng(seed)
  w0 = rng.normal(size=(d_in, d_out)).astype(np.float32) / 4
  target = (rng.normal(size=(d_in, 2)) @ rng.normal(size=(2, d_out))).astype(np.float32) / 2
  x = rng.normal(size=(n, d_in)).astype(np.float32)
  return {"dense": {"kernel": jnp.asarray(w0)}}, (jnp.asarray(x), jnp.asarray(x @ (w0 + target)))


def mse(params, head, batch):
  del head
  x, y = batch
  return jnp.mean((x @ params["dense"]["kernel"] - y) ** 2)


def train_task(sub, params, batch, task_id, steps=300, seed=0, p=2, phi=2):
  state = sj.begin_task(sub, task_id, rng=jax.random.key(seed), p=p, phi=phi)
  opt = optax.adam(3e-2)
  opt_state = opt.init(state)
  step = sj.make_train_step(mse, opt, sub.layout)
  for _ in range(steps):
    state, opt_state, loss = step(state, opt_state, params, sub.bases, batch)
  return state, float(loss)


def test_begin_task_starts_at_zero_delta_with_nonzero_gradient():
  pl = Planted(seed=0)
  sub = sj.init_subspace(pl.params, pl.loras(4), k=4)
  state = sj.begin_task(sub, "new", rng=jax.random.key(0), p=1, phi=2)
  chex.assert_trees_all_equal(sj.adapted_params(pl.params, sub, state), pl.params)
  x = jnp.ones((3, 24))

  def loss(s):
    p = sj.adapted_params(pl.params, sub, s)
    return jnp.sum((x @ p["enc"]["l0"]["value"]["kernel"] - 1.0) ** 2)

  grads = jax.grad(loss)(state)
  assert float(jnp.abs(grads.coef["d24"]).max()) > 0
  assert float(jnp.abs(grads.temp_coef["d24"]).max()) > 0


def test_training_then_finish_task_keeps_what_was_learned():
  params, batch = regression_problem()
  rng = np.random.default_rng(1)
  loras = [
    {"dense": {"kernel": sj.LoRA(rng.normal(size=(12, 2)), rng.normal(size=(2, 10)))}}
    for _ in range(3)
  ]
  sub = sj.init_subspace(params, loras, explained_variance=1.0, center=False)
  start = float(mse(params, None, batch))
  state, loss = train_task(sub, params, batch, "new")
  assert loss < 0.05 * start
  trained = sj.adapted_params(params, sub, state)
  merged = sj.finish_task(sub, state, "new")
  assert merged.task_ids == (0, 1, 2, "new")
  got = sj.task_params(params, merged, "new")
  assert (
    rel_err(
      got["dense"]["kernel"] - params["dense"]["kernel"],
      trained["dense"]["kernel"] - params["dense"]["kernel"],
    )
    < 1e-4
  )
  for t in range(3):  # nothing dropped at explained_variance=1: old tasks are unchanged
    old = sj.task_params(params, sub, t)["dense"]["kernel"]
    assert rel_err(sj.task_params(params, merged, t)["dense"]["kernel"], old) < 1e-4


def test_finish_task_in_place_equals_a_copy():
  pl = Planted(seed=13)
  sub = sj.init_subspace(pl.params, pl.loras(3), k=4, task_capacity=8)
  state = sj.begin_task(sub, "new", rng=jax.random.key(0), p=2, phi=2)
  state = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape), state)
  copied = sj.finish_task(sub, state, "new")
  donated = sj.finish_task(sub, state, "new", donate=True)
  assert all(grp.coef.is_deleted() for grp in sub.groups.values())
  chex.assert_trees_all_equal(
    {g: grp.stored() for g, grp in copied.groups.items()},
    {g: grp.stored() for g, grp in donated.groups.items()},
  )
  assert sj.task_errors(copied) == sj.task_errors(donated)


def test_cold_start_trains_the_first_task_from_data():
  params, batch = regression_problem(seed=2)
  sub = sj.empty_subspace(params, r"kernel$", explained_variance=1.0, center=False)
  assert sub.num_tasks == 0
  state, loss = train_task(sub, params, batch, "first", p=2, phi=2, steps=400)
  assert loss < 0.05 * float(mse(params, None, batch))
  merged = sj.finish_task(sub, state, "first")
  want = sj.adapted_params(params, sub, state)["dense"]["kernel"]
  assert rel_err(sj.task_params(params, merged, "first")["dense"]["kernel"], want) < 1e-4


def test_optimizer_state_exists_only_for_trainable_leaves():
  pl = Planted(seed=3)
  sub = sj.init_subspace(pl.params, pl.loras(3), k=4)
  state = sj.begin_task(sub, "t", rng=jax.random.key(0), p=1, phi=2)
  opt_state = optax.adam(1e-3).init(state)
  n_train = sum(x.size for x in jax.tree.leaves(state))
  n_opt = sum(x.size for x in jax.tree.leaves(opt_state))
  assert n_opt == 2 * n_train + 1  # Adam's two moments + the step count
  assert sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state)) == 4 * n_opt


def test_train_step_compiles_once_across_tasks(monkeypatch):
  params, batch = regression_problem(seed=4)
  sub = sj.empty_subspace(params, r"kernel$", k=4)
  chex.clear_trace_counter()
  real_jit = jax.jit
  monkeypatch.setattr(train.jax, "jit", lambda f: real_jit(chex.assert_max_traces(f, n=1)))
  opt = optax.adam(1e-2)
  step = sj.make_train_step(mse, opt, sub.layout)
  monkeypatch.setattr(train.jax, "jit", real_jit)
  sub = sj.finish_task(sub, sj.begin_task(sub, 0, rng=jax.random.key(0)), 0)
  for t in range(1, 6):
    state = sj.begin_task(sub, t, rng=jax.random.key(t))
    opt_state = opt.init(state)
    for _ in range(3):
      state, opt_state, _ = step(state, opt_state, params, sub.bases, batch)
    sub = sj.finish_task(sub, state, t)
  assert sub.num_tasks == 6


def test_fine_tune_after_merge_with_task_state_and_set_task():
  params, batch = regression_problem(seed=5)
  sub = sj.empty_subspace(params, r"kernel$", explained_variance=0.9)
  state, _ = train_task(sub, params, batch, "a", steps=200)
  sub = sj.finish_task(sub, state, "a")
  tuned = sj.task_state(sub, "a")
  before = float(mse(sj.task_params(params, sub, "a"), None, batch))
  opt = optax.adam(1e-2)
  opt_state = opt.init(tuned)
  step = sj.make_train_step(mse, opt, sub.layout)
  for _ in range(100):
    tuned, opt_state, _ = step(tuned, opt_state, params, sub.bases, batch)
  sub2 = sj.set_task(sub, "a", tuned)
  after = float(mse(sj.task_params(params, sub2, "a"), None, batch))
  assert after <= before
  for grp in sub2.groups.values():
    want = merge.scatter_factor(grp.coef, grp.ncols, center=True)
    np.testing.assert_allclose(
      grp.scatter @ jnp.swapaxes(grp.scatter, 1, 2), want @ jnp.swapaxes(want, 1, 2), atol=1e-4
    )
  with pytest.raises(sj.ShareError, match="temporary factors"):
    sj.set_task(sub, "a", sj.begin_task(sub, "b", rng=jax.random.key(0)))


def test_heads_travel_with_the_task_and_are_counted():
  params, batch = regression_problem(seed=6)
  sub = sj.empty_subspace(params, r"kernel$", k=2)
  state = sj.begin_task(sub, "t", rng=jax.random.key(0), head={"w": jnp.ones((10, 3))})
  sub = sj.finish_task(sub, state, "t")
  chex.assert_trees_all_equal(sub.heads["t"], {"w": jnp.ones((10, 3))})
  assert sj.storage(sub).head_params["t"] == 30


def test_linen_and_nnx_models_train_unchanged():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.relu(nn.Dense(8, name="hidden")(x)))

  x = jnp.ones((4, 5))
  linen_params = Net().init(jax.random.key(0), x)
  nnx_model = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
  graphdef, nnx_state = nnx.split(nnx_model)
  cases = [
    (linen_params, r"hidden/kernel$", lambda p: Net().apply(p, x)),
    (nnx_state, r"kernel", lambda s: nnx.merge(graphdef, s)(x)),
  ]
  for params, target, forward in cases:
    sub = sj.empty_subspace(params, target, k=2)
    state = sj.begin_task(sub, 0, rng=jax.random.key(1))
    grads = jax.grad(
      lambda s, p=params, f=forward, sb=sub: jnp.sum(f(sj.adapted_params(p, sb, s)))
    )(state)
    assert any(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))
    adapted_paths = flatten_with_paths(sj.adapted_params(params, sub, state))
    assert adapted_paths.keys() == flatten_with_paths(params).keys()


class TwoLayer(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(8, name="hidden")(x))
    return nn.Dense(3, name="out")(nn.Dense(8, name="mid")(h))


def sgd_step(loss_fn, params, target, factored, seed=0):
  """(state, state after one SGD step of lr 1 = state - gradient, loss) for a new task in a
  subspace of random LoRAs on the kernels ``target`` selects, both sides non-zero."""
  rng = np.random.default_rng(seed)
  kernels = select_kernels(params, target)
  loras = [
    nest(
      {
        p: sj.LoRA(
          jnp.asarray(rng.normal(size=(w.shape[0], 2)), jnp.float32),
          jnp.asarray(rng.normal(size=(2, w.shape[1])), jnp.float32),
        )
        for p, w in kernels.items()
      }
    )
    for _ in range(3)
  ]
  sub = sj.init_subspace(params, loras, k=3)
  head = jnp.asarray(rng.normal(size=3), jnp.float32)
  state = sj.begin_task(sub, "new", rng=jax.random.key(seed), p=2, phi=2, head=head)
  state = state.replace(coef=jax.tree.map(lambda c: c + 0.1, state.coef))
  opt = optax.sgd(1.0)
  step = sj.make_train_step(loss_fn, opt, sub.layout, factored=factored)
  new, _, loss = step(state, opt.init(state), params, sub.bases, None)
  return state, new, loss


def assert_same_gradients(loss_fn, params, target):
  """The factored step's gradient equals the materialised step's to 1e-5 (relative, per leaf)."""
  state, dense, dense_loss = sgd_step(loss_fn, params, target, factored=False)
  _, fact, fact_loss = sgd_step(loss_fn, params, target, factored=True)
  assert rel_err(fact_loss, dense_loss) < 1e-5
  for g_dense, g_fact in zip(jax.tree.leaves(dense), jax.tree.leaves(fact), strict=True):
    assert rel_err(g_fact, g_dense) < 1e-5
  grads = jax.tree.map(lambda a, b: a - b, state, dense)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads.coef))


def test_factored_step_equals_the_materialised_step_on_linen():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 5)), jnp.float32)
  params = TwoLayer().init(jax.random.key(0), x)

  def loss(p, head, batch):
    del batch
    return jnp.sum(jnp.tanh(TwoLayer().apply(p, x)) * head)

  assert_same_gradients(loss, params, r"(hidden|out)/kernel$")


def test_factored_step_equals_the_materialised_step_on_hf_flax():
  transformers = pytest.importorskip("transformers")
  config = transformers.BertConfig(
    vocab_size=50,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=16,
  )
  model = transformers.FlaxBertModel(config, seed=0)
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 50, (2, 6)), jnp.int32)

  def loss(p, head, batch):
    del batch
    return jnp.sum(model(ids, params=p).pooler_output[:, :3] * head)

  assert_same_gradients(loss, model.params, r"attention/self/(query|value)/kernel$")


def test_a_model_without_linen_dense_trains_materialised():
  x = jnp.ones((4, 5))
  model = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  def loss(s, head, batch):
    del batch
    return jnp.sum(nnx.merge(graphdef, s)(x) * head)

  sgd_step(loss, state, r"kernel", factored=None)  # auto: the materialised step
  with pytest.raises(sj.ShareError, match="no nn.Dense used the adapted kernels"):
    sgd_step(loss, state, r"kernel", factored=True)
