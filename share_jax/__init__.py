"""share_jax: continual learning through one shared low-rank LoRA subspace (Share), in JAX."""

from share_jax._version import __version__
from share_jax.apply import apply_factors, project, reconstruct, task_params
from share_jax.errors import ShareError, UnknownTaskError
from share_jax.fidelity import explained, settle, task_errors
from share_jax.ingest import absorb, compress, empty_subspace, init_subspace
from share_jax.lora import LoRA, apply_lora, init_lora_tree, lora_leaves, select_kernels
from share_jax.paths import flatten_with_paths, nest
from share_jax.storage import Storage, storage
from share_jax.subspace import (
  FactorGroup,
  FidelityError,
  FidelityWarning,
  Layout,
  Subspace,
  SubspaceConfig,
)
from share_jax.train import (
  TaskState,
  adapted_params,
  begin_task,
  finish_task,
  low_rank_loss,
  make_step,
  make_train_step,
  set_task,
  task_state,
)

__all__ = [
  "FactorGroup",
  "FidelityError",
  "FidelityWarning",
  "Layout",
  "LoRA",
  "ShareError",
  "Storage",
  "Subspace",
  "SubspaceConfig",
  "TaskState",
  "UnknownTaskError",
  "__version__",
  "absorb",
  "adapted_params",
  "apply_factors",
  "apply_lora",
  "begin_task",
  "compress",
  "empty_subspace",
  "explained",
  "finish_task",
  "flatten_with_paths",
  "init_lora_tree",
  "init_subspace",
  "lora_leaves",
  "low_rank_loss",
  "make_step",
  "make_train_step",
  "nest",
  "project",
  "reconstruct",
  "select_kernels",
  "set_task",
  "settle",
  "storage",
  "task_errors",
  "task_params",
  "task_state",
]
