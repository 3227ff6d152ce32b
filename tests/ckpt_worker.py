"""A process that saves a deterministic subspace per version until it is killed.

``tests/test_checkpoint.py`` starts ``save_forever`` in a process forked from a server that
preloaded ``share_jax.checkpoint`` (so each start is fast), SIGKILLs it mid-save and checks every
listed version against ``subspace_for(version)``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from share_jax.checkpoint import Checkpointer
from share_jax.subspace import FactorGroup, KernelSpec, Layout, Subspace, SubspaceConfig

MAX_TO_KEEP = 3
D, KERNELS, K, T, P = 256, 4, 32, 8, 8  # about 1.5 MB of arrays per version


def subspace_for(version: int) -> Subspace:
  """A subspace whose every array and task id depends on ``version`` only."""
  rng = np.random.default_rng(version)
  layout = Layout(tuple(KernelSpec(f"layer_{i}/kernel", (D, D), "float32") for i in range(KERNELS)))
  n = 2 * KERNELS
  group = FactorGroup(
    basis=jnp.asarray(rng.normal(size=(n, D, K)), jnp.float32),
    rank=jnp.full((n,), version % K, jnp.int32),
    coef=jnp.asarray(rng.normal(size=(n, K, T, P)), jnp.float32),
    ncols=jnp.full((T, n), P, jnp.int32),
    scatter=jnp.asarray(rng.normal(size=(n, K, K)), jnp.float32),
    energy=jnp.asarray(rng.uniform(size=(n,)), jnp.float32),
    lost=jnp.asarray(rng.uniform(size=(n,)), jnp.float32),
  )
  task_ids = tuple(f"task{version}-{i}" if i % 2 else i for i in range(1 + version % T))
  heads = {task_ids[0]: {"classifier": {"kernel": jnp.full((D, 3), version, jnp.float32)}}}
  return Subspace.create(
    groups={f"d{D}": group},
    heads=heads,
    layout=layout,
    task_ids=task_ids,
    config=SubspaceConfig(explained_variance=0.5 + version % 5 / 10),
  )


def _kill_when_writing(directory: Path) -> None:
  """SIGKILL this process as soon as a version is being written (Orbax's temporary directory
  exists): a kill that lands mid-write for certain."""
  while not any(".orbax-checkpoint-tmp" in p.name for p in directory.iterdir()):
    time.sleep(0.0005)
  os.kill(os.getpid(), signal.SIGKILL)


def save_forever(directory: str, progress: str, kill_mid_write_after: int | None = None) -> None:
  """Append ``ready``, then each version number once its save has returned, to ``progress``.

  ``kill_mid_write_after``: after that many completed saves, die in the middle of the next one.
  """
  with open(progress, "a") as log, Checkpointer(directory, max_to_keep=MAX_TO_KEEP) as ckpt:
    print("ready", file=log, flush=True)
    completed = 0
    while True:
      if completed == kill_mid_write_after:
        Path(directory).mkdir(parents=True, exist_ok=True)
        threading.Thread(target=_kill_when_writing, args=(Path(directory),), daemon=True).start()
      version = (ckpt.latest() or 0) + 1
      ckpt.save(subspace_for(version), task_meta={0: {"version": version}})
      completed += 1
      print(version, file=log, flush=True)
