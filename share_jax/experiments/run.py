"""Continual-learning runner: every method of a config on the same tasks, one results.json.

    python -m share_jax.run --config configs/text_domains.py --workdir runs/demo
    python -m share_jax.run --config configs/text_domains.py --workdir /tmp/q --config.quick=True

Writes ``WORKDIR/results.json`` (per method: accuracy matrix in percent, ACC, BWT, forgetting,
FWT, parameters and bytes per task, wall time, strictness), ``WORKDIR/accuracy.png`` and, for
Share and per-task LoRA, ``WORKDIR/diagnostics_<method>/`` (``share_jax.diagnostics``), and
prints a comparison table. Metrics are defined in ``share_jax.experiments.metrics``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import importlib
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags
from tqdm.auto import tqdm

from share_jax import diagnostics
from share_jax.errors import ShareError
from share_jax.experiments import backbones, glue, hf_backbone, report, synthetic
from share_jax.experiments import data as datasets
from share_jax.experiments.config import ALL_METHODS
from share_jax.experiments.fitting import EncodedTask, check_task, encode_task
from share_jax.experiments.methods import METHODS, Context, Method
from share_jax.experiments.plots import plot_accuracy
from share_jax.lora import select_kernels


def define_flags(flag_values: flags.FlagValues) -> tuple[flags.FlagHolder, flags.FlagHolder]:
  """``--config`` (with its ``--config.*`` overrides) and ``--workdir`` on ``flag_values``."""
  config = config_flags.DEFINE_config_file(
    "config", None, "Experiment config (configs/*.py).", flag_values=flag_values
  )
  workdir = flags.DEFINE_string(
    "workdir", None, "Where results.json and accuracy.png go.", flag_values=flag_values
  )
  return config, workdir


VISION = "share_jax.experiments.vision"
EFFICIENTNET = "share_jax.experiments.vision_efficientnet"


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """An unlocked copy, with ``quick_overrides`` applied when ``quick`` is set and every method
  when ``all_methods`` is."""
  config = ml_collections.ConfigDict(config.to_dict())
  if config.quick:
    config.update(config.quick_overrides)
  if config.get("all_methods"):
    config.methods = ALL_METHODS
  return config


def load_tasks(config) -> tuple[list, str]:
  """(tasks, note). In quick mode, missing dataset packages fall back to synthetic tasks."""
  d, seed = config.data, config.seed
  sizes = dict(n_train_per_class=d.n_train_per_class, n_test_per_class=d.n_test_per_class)
  loaders = {
    "text_domains": lambda: datasets.text_domain_sequence(**sizes, seed=seed),
    "bbc_class_incremental": lambda: datasets.bbc_class_incremental(
      d.get("splits", datasets.tasks.BBC_CLASS_INCREMENTAL), **sizes, seed=seed
    ),
    "split_fashion_mnist": lambda: datasets.split_fashion_mnist(**sizes, seed=seed),
    "fashion_then_mnist": lambda: importlib.import_module(EFFICIENTNET).fashion_then_mnist(
      **sizes, seed=seed
    ),
    "glue": lambda: glue.glue_sequence(
      config.get("data_dir"),
      d.tasks,
      max_train=d.max_train,
      max_test=d.max_test,
      seed=seed,
      metrics=d.get("metrics"),
    ),
  }
  if d.name not in loaders:
    raise ShareError(f"unknown data.name {d.name!r}; known: {sorted(loaders)}")
  try:
    return loaders[d.name]()[: d.num_tasks or None], "real data"
  except FileNotFoundError as e:
    if not config.quick:
      raise
    make = (
      synthetic.synthetic_image_tasks
      if d.name in ("split_fashion_mnist", "fashion_then_mnist")
      else synthetic.synthetic_text_tasks
    )
    tasks = make(
      d.num_tasks or 3, n_train=d.n_train_per_class, n_test=d.n_test_per_class, seed=seed
    )
    return tasks, f"SYNTHETIC data (the real dataset is missing: {e})"


def make_backbone(config) -> backbones.Backbone:
  """The config's backbone, with ``config.target`` checked against its parameters."""
  kwargs = {k: v for k, v in config.backbone.items() if k != "name"}
  name = config.backbone.name
  if name == "hf" or config.get("model_dir"):  # a local HF checkpoint replaces the backbone
    options = {k: v for k, v in kwargs.items() if k in hf_backbone.OPTIONS}
    backbone = hf_backbone.hf_backbone(config.get("model_dir"), **options)
  elif name == "minilm":
    backbone = backbones.minilm_backbone(**kwargs)
  elif name == "tiny_bert":
    backbone = backbones.tiny_bert_backbone(**kwargs)
  elif name == "vit":
    try:
      vision = importlib.import_module(VISION)
    except ModuleNotFoundError as e:
      raise ShareError(f"backbone 'vit' needs {VISION}.vit_backbone, not available: {e}") from e
    backbone = vision.vit_backbone(**kwargs)
  elif name == "efficientnet":
    backbone = importlib.import_module(EFFICIENTNET).efficientnet_backbone(**kwargs)
  else:
    raise ShareError(
      f"unknown backbone.name {name!r}; known: hf, minilm, tiny_bert, vit, efficientnet"
    )
  if config.target:
    backbone = dataclasses.replace(backbone, target=config.target)
  try:
    select_kernels(backbone.params, backbone.target)
  except ShareError as e:
    raise ShareError(f"backbone {backbone.name}: {e}") from None
  return backbone


def accuracy_matrix(method: Method, tasks: list[EncodedTask]) -> np.ndarray:
  """R (T, T) in percent: after each task, every task seen so far (joint methods: last row)."""
  t = len(tasks)
  r = np.full((t, t), np.nan)
  if method.joint:
    method.learn_all(tasks)
    r[-1] = [100 * method.evaluate(j, task) for j, task in enumerate(tasks)]
    return r
  for i, task in enumerate(tasks):
    method.learn(i, task)
    for j in range(i + 1):
      reuse = method.static_old_tasks and j < i
      r[i, j] = r[i - 1, j] if reuse else 100 * method.evaluate(j, tasks[j])
  return r


def write_diagnostics(method: Method, names: list[str], directory: Path) -> None:
  """Subspace diagnostics (``share_jax.diagnostics``: explained variance vs k, task similarity)
  of a Share run's subspace, and of per-task LoRAs (the paper's Figure 1)."""
  subspace = getattr(method, "subspace", None)
  if subspace is not None:
    labels = [names[t] if isinstance(t, int) else str(t) for t in subspace.task_ids]
    diagnostics.write_report(subspace, directory, labels)
  elif method.name == "lora_per_task" and method.models:
    diagnostics.write_report({names[i]: lora for i, (lora, _) in method.models.items()}, directory)


def reference_diagonal(matrices: dict[str, np.ndarray]) -> np.ndarray | None:
  """Isolated per-task accuracies for FWT: per-task LoRA, else head-only."""
  for name in ("lora_per_task", "head_only"):
    if name in matrices:
      return np.diag(matrices[name])
  return None


def machine() -> str:
  return f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}"


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
  """Runs ``config.methods`` in order; returns what it writes to ``workdir/results.json``."""
  config = resolve(config)
  unknown = sorted(set(config.methods) - METHODS.keys())
  if unknown:
    raise ShareError(f"unknown methods {unknown}; known: {sorted(METHODS)}")
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  start, cpu_start = time.time(), time.process_time()
  raw, note = load_tasks(config)
  for task in raw:
    check_task(task)
  backbone = make_backbone(config)
  print(f"backbone {backbone.name}, target {backbone.target!r}; {note}", flush=True)
  tasks = [encode_task(backbone, t) for t in tqdm(raw, desc="encode", leave=False)]
  encode_s = time.time() - start
  ctx = Context(backbone, config, config.seed)
  matrices, walls, methods = {}, {}, {}
  for name in config.methods:
    t0, c0 = time.time(), time.process_time()
    methods[name] = METHODS[name](ctx)
    matrices[name] = accuracy_matrix(methods[name], tasks)
    walls[name] = time.time() - t0, time.process_time() - c0
    print(f"{name}: final row {np.round(matrices[name][-1], 1).tolist()}", flush=True)
  reference = reference_diagonal(matrices)
  results = {
    name: report.method_result(methods[name], matrices[name], *walls[name], reference)
    for name in config.methods
  }
  out = {
    "methods": results,
    "tasks": [t.name for t in raw],
    "task_metrics": [t.metric for t in raw],
    "data": note,
    "backbone": backbone.name,
    "target": backbone.target,
    "units": "scores (task_metrics: accuracy, Matthews, Pearson, …) ×100; bytes as float32",
    "fwt_reference": next((n for n in ("lora_per_task", "head_only") if n in matrices), None),
    "encode_s": round(encode_s, 1),
    "total_s": round(time.time() - start, 1),
    "total_cpu_s": round(time.process_time() - cpu_start, 1),
    "machine": machine(),
    "date": datetime.datetime.now().isoformat(timespec="seconds"),
    "config": config.to_dict(),
  }
  (workdir / "results.json").write_text(json.dumps(out, indent=1, default=list))
  plot_accuracy(matrices, out["tasks"], workdir / "accuracy.png")
  for name, method in methods.items():
    write_diagnostics(method, [t.name for t in raw], workdir / f"diagnostics_{name}")
  print(report.table(results))
  ratios = report.parameter_ratios(results)
  if ratios:
    print(ratios)
  print(
    f"{note}; total {out['total_s']:.0f} s wall, {out['total_cpu_s']:.0f} s CPU; "
    f"wrote {workdir / 'results.json'}",
    flush=True,
  )
  return out


# glibc ``mallopt`` options: one arena, no mmap'd chunks, no trimming, 512 MiB of top padding.
_KEEP_FREED_MEMORY = ((-8, 1), (-4, 0), (-1, 2**31 - 1), (-2, 2**29))


def keep_freed_memory() -> bool:
  """On glibc, keeps freed memory in the process for reuse (``mallopt``); whether it did.

  XLA's CPU runtime frees about 170 MB of temporaries after every MiniLM training step; handed
  back to the kernel they return as ~42,000 page faults per step, a quarter of the step's CPU
  time spent in the kernel zeroing pages. Kept, the next step reuses them. Process-wide, so only
  the command-line entry points call it, before the first computation.
  """
  if platform.libc_ver()[0] != "glibc":
    return False
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):
    return False
  return all(mallopt(option, value) == 1 for option, value in _KEEP_FREED_MEMORY)


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point (``share-jax run`` calls it): ``argv`` are the flags, default
  ``sys.argv[1:]``. Returns the exit status."""
  full = ["share_jax.run", *(sys.argv[1:] if argv is None else argv)]
  fresh = flags.FlagValues()  # per call: a second run in one process redefines nothing
  config, workdir = define_flags(fresh)
  saved, sys.argv = sys.argv, full  # config_flags finds the --config.* overrides in sys.argv
  try:
    rest = fresh(full)
  finally:
    sys.argv = saved
  if len(rest) > 1:
    raise SystemExit(f"unexpected arguments {rest[1:]}")
  if config.value is None or workdir.value is None:
    raise SystemExit("usage: python -m share_jax.run --config configs/NAME.py --workdir DIR")
  keep_freed_memory()
  run(config.value, workdir.value)
  return 0


if __name__ == "__main__":
  sys.exit(main())
