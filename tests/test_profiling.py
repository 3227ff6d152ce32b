"""share_jax.profiling: phases and kernel calls of a merge are recorded only inside ``record``,
replaying the kernels gives the merge's own result, and recording changes no result."""

import jax
import numpy as np

import share_jax as sj
from share_jax import profiling


def loras(n, seed, d=12, r=2):
  rng = np.random.default_rng(seed)
  return [
    sj.nest(
      {
        f"layer_{i}/kernel": sj.LoRA(
          rng.normal(size=(d, r)).astype(np.float32), rng.normal(size=(r, d)).astype(np.float32)
        )
        for i in range(2)
      }
    )
    for _ in range(n)
  ]


PARAMS = sj.nest({f"layer_{i}/kernel": np.zeros((12, 12), np.float32) for i in range(2)})


def test_absorb_records_phases_and_replayable_kernels():
  base = sj.init_subspace(PARAMS, loras(3, 0), k=4)
  new = loras(1, 1)
  plain = sj.absorb(base, new, task_ids=["new"])
  with profiling.record() as rec:
    out = sj.absorb(base, new, task_ids=["new"])
  assert set(rec.seconds) == {"validate", "stack", "merge"}
  assert all(s > 0 for s in rec.seconds.values())
  assert len(rec.kernels) >= len(base.groups)
  for g in out.groups:  # recording changes nothing
    np.testing.assert_array_equal(out.groups[g].basis, plain.groups[g].basis)
    np.testing.assert_array_equal(out.groups[g].coef, plain.groups[g].coef)
  *_, (replayed, *_) = rec.replay()  # one group here: the last kernel call made its result
  (g,) = out.groups
  np.testing.assert_array_equal(replayed.basis, out.groups[g].basis)
  compiled = rec.kernels[0].lower().compile()
  assert "dot" in compiled.as_text()


def test_nothing_is_recorded_outside_the_block():
  with profiling.record() as rec:
    pass
  sub = sj.init_subspace(PARAMS, loras(2, 2), k=4)
  sj.absorb(sub, loras(1, 3), task_ids=["x"])
  assert rec.seconds == {} and rec.kernels == []


def test_finish_task_records_the_merge_phase():
  sub = sj.empty_subspace(PARAMS, r"kernel$", k=4)
  state = sj.begin_task(sub, "t", rng=jax.random.key(0), p=1, phi=2)
  with profiling.record() as rec:
    sj.finish_task(sub, state, "t")
  assert set(rec.seconds) == {"validate", "merge"} and rec.kernels
