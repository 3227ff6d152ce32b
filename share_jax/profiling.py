"""Opt-in timing of the merge pipeline (init_subspace, absorb, finish_task, project).

    with sj.profiling.record() as rec:
      sub = sj.absorb(sub, loras, task_ids=["new"])
    rec.seconds      # wall seconds per phase: {"validate": …, "stack": …, "merge": …}
    rec.kernels      # the jitted merge kernel calls made, with their arguments
    rec.replay()     # run those kernels again alone (their outputs, computed and waited for)

Phases: ``validate`` (task ids, LoRA trees against the layout), ``stack`` (LoRA factors into
per-group column stacks), ``merge`` (capacity planning and the merge kernels, results waited
for). Outside ``record`` the hooks cost one context-variable read; results never change.
"""

from share_jax._profiling import KernelCall, Recording, record

__all__ = ["KernelCall", "Recording", "record"]
