"""A sharded merge and data-parallel steps, with their one-device reference.

The multi-device checks run ``run`` on 8 simulated devices; the multi-host test runs it in two
processes joined by ``jax.distributed``: ``python tests/sharded_run.py PORT PROCESS_ID
NUM_PROCESSES OUT.npz`` is one such worker (process 0 writes the results).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpy_reference import Planted

import share_jax as sj
from share_jax import sharding, train

# Group d24 has L = 16 slots (split over the devices), group d16 L = 2 (replicated).
SHAPES = {f"enc/l{i}/{n}/kernel": (24, 24) for i in range(4) for n in ("query", "value")} | {
  "enc/out/kernel": (16, 16)
}
BATCH, STEPS = 16, 3
OPTIMIZER = optax.adam(1e-2)


def problem():
  """(params, subspace of 3 tasks, 2 new LoRAs, a regression batch); the same in every process."""
  pl = Planted(seed=7, shapes=SHAPES)
  sub = sj.init_subspace(pl.params, pl.loras(3), k=4)
  rng = np.random.default_rng(7)
  batch = tuple(rng.normal(size=(BATCH, 24)).astype(np.float32) for _ in range(2))
  return jax.tree.map(jnp.asarray, pl.params), sub, pl.loras(2, rank=4), batch


def loss_fn(params, head, batch):
  x, y = batch
  enc = params["enc"]
  for i in range(4):
    layer = enc[f"l{i}"]
    x = jnp.tanh(x + x @ layer["query"]["kernel"] + x @ layer["value"]["kernel"])
  return jnp.mean((x[:, :16] @ enc["out"]["kernel"] - y[:, :16]) ** 2)


def _train(step, trainable, opt_state, params, bases, batch) -> dict[str, np.ndarray]:
  """STEPS steps; the final coefficients and every loss as host arrays."""
  losses = []
  for _ in range(STEPS):
    trainable, opt_state, loss = step(trainable, opt_state, params, bases, batch)
    losses.append(loss)
  out = {f"train/coef/{g}": np.asarray(c) for g, c in trainable.coef.items()}
  return out | {"train/losses": np.asarray(losses)}


def fields(grp: sj.FactorGroup) -> dict[str, np.ndarray]:
  """A group's fields as host arrays; of the frame bases only those of frames in use (the
  others are any array of the shape)."""
  out = {name: np.asarray(leaf) for name, leaf in vars(grp).items()}
  out["frame_basis"] = out["frame_basis"][: int(out["frame"].max()) + 1]
  return out


def _merged(sub: sj.Subspace) -> dict[str, np.ndarray]:
  return {
    f"merge/{g}/{name}": leaf for g, grp in sub.groups.items() for name, leaf in fields(grp).items()
  }


def reference() -> dict[str, np.ndarray]:
  """Unsharded: a plain absorb and STEPS plain training steps."""
  params, sub, new, batch = problem()
  merged = sj.absorb(sub, new, task_ids=["x", "y"])
  trainable = train.task_state(sub, 0)  # fine-tune task 0
  step = train.make_train_step(loss_fn, OPTIMIZER, sub.layout)
  return _merged(merged) | _train(
    step, trainable, OPTIMIZER.init(trainable), params, sub.bases, batch
  )


def sharded_merge(mesh) -> sj.Subspace:
  """The reference's absorb on a subspace whose layer axes are split over ``mesh``."""
  _, sub, new, _ = problem()
  return sj.absorb(sharding.shard_subspace(sub, mesh), new, task_ids=["x", "y"])


def run(mesh) -> dict[str, np.ndarray]:
  """The reference on ``mesh``: a sharded merge, data-parallel steps; results gathered."""
  merged = sharded_merge(mesh)
  params, sub, _, batch = problem()
  trainable = train.task_state(sub, 0)  # fine-tune task 0
  step = sharding.data_parallel_step(loss_fn, OPTIMIZER, sub.layout, mesh)
  n, i = jax.process_count(), jax.process_index()
  local = jax.tree.map(lambda x: x[i * BATCH // n : (i + 1) * BATCH // n], batch)
  batch = sharding.shard_batch(local, mesh)
  state = sharding.replicate((trainable, OPTIMIZER.init(trainable), params, sub.bases), mesh)
  gathered = merged.replace(groups=sharding.replicate(merged.groups, mesh))
  return _merged(gathered) | _train(step, *state, batch)


def main(port: str, process_id: str, num_processes: str, out: str) -> None:
  jax.config.update("jax_num_cpu_devices", 2)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    f"127.0.0.1:{port}", int(num_processes), int(process_id), initialization_timeout=60
  )
  results = run(sharding.make_mesh())
  if jax.process_index() == 0:
    np.savez(out, **results)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(*sys.argv[1:])
