"""Training the zoo: one rank-r LoRA (+ its own linear head) per task on cached frozen features,
each written as a PEFT adapter directory, and reading the zoo back for evaluation.

    python -m share_jax.experiments.zoo_train --out DIR [--kind text|fashion] [--quick]
        [--backbone efficientnet] [--lr LR] [--epochs N] [--head trained|frozen]
        [--init task|shared]

``--head frozen``: each task's head is a fixed random matrix drawn from the task's seed
(``frozen_head``), never trained, so everything a task learns is in its LoRA (as in an LLM, which
has no task heads); default ``trained``: the head is trained jointly with the LoRA.

``--init shared``: every task's LoRA starts from the same initialisation (one key drawn from the
zoo seed alone), as adapters trained with one recipe and one fixed seed do; default ``task``: each
LoRA starts from its task's seed. Heads and data order are the same either way.

``DIR/zoo.json`` holds the settings and one row per task (classes, split sizes, majority-class
accuracy, the LoRA's test accuracy, the accuracy of its head with the adapter removed, training
seconds); ``DIR/adapters/<task>/`` the PEFT adapters (``modules_to_save``: ``classifier``).
Training resumes: tasks whose row and adapter exist are skipped. Features of the frozen bottom
layers are computed once per zoo and cached in ``DIR/features.npz``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import share_jax as sj
from share_jax import peft_io
from share_jax.experiments import backbones, fitting, zoo
from share_jax.experiments.backbones import Backbone, Inputs

# Flax kernel paths "params/layer_{i}/attention/{query,value}/kernel" ↔ BERT-style PEFT modules;
# any other kernel (EfficientNet's "params/block_15/expand_conv/kernel") ↔ its path less "params/"
# ("block_15.expand_conv", a PEFT Conv2d LoRA).
SCHEME = peft_io.Scheme(
  "zoo",
  (
    ("encoder.layer.{i}.attention.self.{qkv}", "params/layer_{i}/attention/{qkv}"),
    ("{path}", "params/{path}"),
  ),
)
HEAD = "classifier"
# EfficientNet-Lite0 zoos: Fashion-MNIST upsampled to this size, the last 2 blocks + head adapted.
EFFICIENTNET_IMAGE_SIZE = 96
EFFICIENTNET_ADAPT_BLOCKS = 2
BACKBONES = ("minilm", "tiny_bert", "vit", "vit_tiny", "efficientnet", "efficientnet_tiny")
HEAD_MODES = ("trained", "frozen")
INIT_MODES = ("task", "shared")


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything that fixes a zoo (written to zoo.json)."""

  kind: str = "text"
  backbone: str = "minilm"
  max_len: int = 32
  frozen_layers: int = 5
  n_train: int = 48
  n_test: int = 40
  rank: int = 8
  lr: float = 1e-2
  epochs: int = 5
  batch_size: int = 32
  seed: int = 0
  max_tasks: int | None = None
  head: str = "trained"  # or "frozen": a fixed random head per task, only the LoRA trains
  init: str = "task"  # or "shared": every task's LoRA from the same initialisation

  def __post_init__(self):
    for name, modes in (("head", HEAD_MODES), ("init", INIT_MODES)):
      if getattr(self, name) not in modes:
        raise ValueError(f"unknown {name} mode {getattr(self, name)!r}; known: {', '.join(modes)}")

  @classmethod
  def quick(cls, kind: str = "text", tiny: bool = False, backbone: str | None = None) -> Settings:
    """≥ 20 tasks, few examples; ``tiny``: a random tiny backbone (tests, no assets needed for
    the model; the data still come from the installed packages). ``backbone``: "efficientnet"
    for a fashion zoo on EfficientNet-Lite0 (default: the kind's own)."""
    base = cls(kind=kind, n_train=24, n_test=16, epochs=4, max_tasks=22, batch_size=16)
    if kind == "fashion":
      vision = backbone or "vit"
      base = dataclasses.replace(base, backbone=f"{vision}_tiny" if tiny else vision)
      return dataclasses.replace(base, frozen_layers=0)
    if tiny:
      base = dataclasses.replace(base, backbone="tiny_bert", max_len=16, frozen_layers=1)
    return base

  @classmethod
  def full(cls, kind: str = "text", backbone: str | None = None) -> Settings:
    if kind == "fashion":
      return cls(kind="fashion", backbone=backbone or "vit", frozen_layers=0, n_test=64)
    return cls()


def make_backbone(s: Settings, cache_dir: Path) -> Backbone:
  if s.backbone == "minilm":
    return backbones.minilm_backbone(max_len=s.max_len, frozen_layers=s.frozen_layers)
  if s.backbone == "tiny_bert":
    return backbones.tiny_bert_backbone(max_len=s.max_len, frozen_layers=s.frozen_layers)
  if s.backbone in ("vit", "vit_tiny"):
    from share_jax.experiments import vision

    return vision.vit_backbone(cache_dir=cache_dir, quick=s.backbone == "vit_tiny", seed=0)
  if s.backbone in ("efficientnet", "efficientnet_tiny"):
    from share_jax.experiments import vision_efficientnet

    return vision_efficientnet.efficientnet_backbone(
      image_size=EFFICIENTNET_IMAGE_SIZE,
      adapt_blocks=EFFICIENTNET_ADAPT_BLOCKS,
      quick=s.backbone == "efficientnet_tiny",
      seed=0,
    )
  raise ValueError(f"unknown backbone {s.backbone!r}; known: {', '.join(BACKBONES)}")


def conv_shapes(params: Any, lora: Any) -> dict[str, tuple[int, ...]]:
  """{path: (kh, kw, c_in, c_out)} of the convolution kernels ``lora`` adapts (PEFT Conv2d)."""
  kernels = sj.flatten_with_paths(params)
  return {p: tuple(np.shape(kernels[p])) for p in sj.lora_leaves(lora) if np.ndim(kernels[p]) == 4}


def universe_key(universe) -> str:
  """SHA-256 of the universe's items in order (texts or a uint8 image array)."""
  h = hashlib.sha256()
  if isinstance(universe, np.ndarray):
    h.update(repr((universe.shape, universe.dtype.str)).encode())
    h.update(np.ascontiguousarray(universe).tobytes())
  else:
    for item in universe:
      h.update(item.encode())
      h.update(b"\0")
  return h.hexdigest()


def encode_universe(backbone: Backbone, universe, path: Path) -> Inputs:
  """``backbone.encode`` of every universe item, cached at ``path``, keyed by the backbone and
  the universe's content: another seed draws another universe of the same size, never reused."""
  key = universe_key(universe)
  if path.is_file():
    with np.load(path, allow_pickle=False) as f:
      meta = {"__backbone__": backbone.name, "__universe__": key}
      if all(k in f.files and str(f[k]) == v for k, v in meta.items()):
        return {k: f[k] for k in f.files if k not in meta}
  inputs = {k: np.asarray(v) for k, v in backbone.encode(universe).items()}
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as f:
    np.savez(f, __backbone__=np.asarray(backbone.name), __universe__=np.asarray(key), **inputs)
  os.replace(f.name, path)
  return inputs


def encoded(task: zoo.ZooTask, inputs: Inputs) -> fitting.EncodedTask:
  return fitting.EncodedTask(
    task.name,
    task.spec.num_classes,
    fitting.take(inputs, task.train),
    task.y_train,
    fitting.take(inputs, task.test),
    task.y_test,
  )


class Evaluator:
  """Test predictions and accuracy of (LoRA tree or None, head) on an encoded task, through one
  jitted path."""

  def __init__(self, backbone: Backbone, eval_batch: int = 128):
    self.backbone, self.eval_batch = backbone, eval_batch
    self.predict = jax.jit(
      lambda params, head, x: jnp.argmax(fitting.logits(head, backbone.features(params, x)), -1)
    )

  def predictions(self, lora: Any, head: fitting.Head, task: fitting.EncodedTask) -> np.ndarray:
    """(N_test,) predicted labels."""
    params = self.backbone.params if lora is None else sj.apply_lora(self.backbone.params, lora)
    return backbones.batched(lambda x: self.predict(params, head, x), task.x_test, self.eval_batch)

  def accuracy(self, lora: Any, head: fitting.Head, task: fitting.EncodedTask) -> float:
    return float(np.mean(self.predictions(lora, head, task) == task.y_test))


def to_peft_head(head: fitting.Head) -> dict:
  return {HEAD: {"kernel": np.asarray(head["w"]), "bias": np.asarray(head["b"])}}


def from_peft_head(heads: dict) -> fitting.Head:
  return {"w": jnp.asarray(heads[HEAD]["kernel"]), "b": jnp.asarray(heads[HEAD]["bias"])}


@dataclasses.dataclass
class LoadedZoo:
  settings: Settings
  zoo: zoo.Zoo
  backbone: Backbone
  tasks: list[fitting.EncodedTask]
  rows: list[dict]
  directory: Path

  def adapter_dir(self, name: str) -> Path:
    return self.directory / "adapters" / name


def prepare(s: Settings, directory: Path, data_dir=None) -> LoadedZoo:
  """The zoo's tasks and backbone with features encoded (cached); rows from zoo.json if any."""
  z = zoo.build_zoo(
    s.kind,
    n_train=s.n_train,
    n_test=s.n_test,
    seed=s.seed,
    max_tasks=s.max_tasks,
    data_dir=data_dir,
  )
  backbone = make_backbone(s, directory / "cache")
  inputs = encode_universe(backbone, z.universe, directory / "features.npz")
  manifest = directory / "zoo.json"
  rows = json.loads(manifest.read_text())["tasks"] if manifest.is_file() else []
  return LoadedZoo(s, z, backbone, [encoded(t, inputs) for t in z.tasks], rows, directory)


def _write_manifest(lz: LoadedZoo) -> None:
  doc = {
    "settings": dataclasses.asdict(lz.settings),
    "backbone": lz.backbone.name,
    "num_tasks": len(lz.zoo.tasks),
    "tasks": lz.rows,
  }
  path = lz.directory / "zoo.json"
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(doc, indent=1))
  os.replace(tmp, path)


def frozen_head(key: jax.Array, feature_dim: int, num_classes: int) -> fitting.Head:
  """A fixed random head: (feature_dim, num_classes) orthonormal columns (QR of a Gaussian), so
  each logit is the features' projection on a random unit direction; bias 0."""
  w, _ = jnp.linalg.qr(jax.random.normal(key, (feature_dim, num_classes)))
  return {"w": w, "b": jnp.zeros((num_classes,))}


def task_key(s: Settings, name: str) -> jax.Array:
  """The task's seed: its LoRA's initialisation (and, folded with 1, its frozen head)."""
  return jax.random.fold_in(jax.random.key(s.seed), zlib_hash(name))


# Folded into the zoo seed for the shared LoRA initialisation: above zlib_hash's 31 bits, so it is
# never a task's key.
_SHARED_INIT = 2**31


def initial_lora(s: Settings, backbone: Backbone, name: str) -> dict:
  """Task ``name``'s LoRA before training: from its task key (``s.init == "task"``) or, for every
  task alike, from one key of the zoo seed alone (``"shared"``)."""
  shared = jax.random.fold_in(jax.random.key(s.seed), _SHARED_INIT)
  key = shared if s.init == "shared" else task_key(s, name)
  return sj.init_lora_tree(backbone.params, backbone.target, rank=s.rank, rng=key)


def make_task_trainer(s: Settings, backbone: Backbone):
  """``train(task, index) -> (lora, head)``: one task's rank-``s.rank`` LoRA (initialised by
  ``initial_lora``), with its head trained jointly (``s.head == "trained"``) or fixed to
  ``frozen_head`` (``"frozen"``)."""
  loss = fitting.classification_loss(backbone.features)
  opt = optax.adam(s.lr)

  def objective(tr, params, fixed_head, batch):
    head = tr["head"] if "head" in tr else fixed_head
    return loss(sj.apply_lora(params, tr["lora"]), head, batch)

  step = sj.make_step(objective, opt)

  def train(task: fitting.EncodedTask, index: int):
    key = task_key(s, task.name)
    lora = initial_lora(s, backbone, task.name)
    fixed = None
    trainable = {"lora": lora}
    if s.head == "frozen":
      fixed = frozen_head(jax.random.fold_in(key, 1), backbone.feature_dim, task.num_classes)
    else:
      trainable["head"] = fitting.zero_head(backbone.feature_dim, task.num_classes)
    trainable, _ = fitting.fit(
      lambda tr, o, b: step(tr, o, backbone.params, fixed, b),
      trainable,
      opt.init(trainable),
      [(task.x_train, task.y_train, {})],
      epochs=s.epochs,
      batch_size=s.batch_size,
      seed=s.seed * 7919 + index,
      desc=task.name,
    )
    return trainable["lora"], trainable.get("head", fixed)

  return train


def _same_settings(recorded: dict, s: Settings) -> bool:
  """Zoos written before the head (init) mode existed trained their heads (initialised each
  LoRA from its task's seed)."""
  return {"head": "trained", "init": "task", **recorded} == dataclasses.asdict(s)


def train_zoo(s: Settings, directory: str | Path, data_dir=None, log=None) -> LoadedZoo:
  """Trains (or resumes) every task's LoRA + head; returns the loaded zoo with all rows."""
  directory = Path(directory)
  log = log or (lambda msg: print(msg, flush=True))
  lz = prepare(s, directory, data_dir)
  manifest = directory / "zoo.json"
  if manifest.is_file() and not _same_settings(json.loads(manifest.read_text())["settings"], s):
    raise ValueError(f"{manifest} was made with other settings; use another directory")
  done = {r["name"]: r for r in lz.rows if lz.adapter_dir(r["name"]).is_dir()}
  ev = Evaluator(lz.backbone)
  train = make_task_trainer(s, lz.backbone)
  rows = []
  start_all = time.perf_counter()
  for i, (spec_task, task) in enumerate(zip(lz.zoo.tasks, lz.tasks, strict=True)):
    if task.name in done:
      rows.append(done[task.name])
      continue
    start = time.perf_counter()
    lora, head = train(task, i)
    seconds = time.perf_counter() - start
    out = lz.adapter_dir(task.name)
    if out.exists():  # a run killed between writing the adapter and the manifest
      shutil.rmtree(out)
    peft_io.write_adapter(
      out,
      lora,
      scheme=SCHEME,
      heads=to_peft_head(head),
      kernel_shapes=conv_shapes(lz.backbone.params, lora),
    )
    row = {
      "name": task.name,
      "family": spec_task.spec.family,
      "classes": [c for c, _ in spec_task.spec.classes],
      "cells": [list(cells) for _, cells in spec_task.spec.classes],
      "n_train": int(len(task.y_train)),
      "n_test": int(len(task.y_test)),
      "majority_acc": spec_task.majority_accuracy,
      "lora_acc": ev.accuracy(lora, head, task),
      "head_without_adapter_acc": ev.accuracy(None, head, task),
      "train_seconds": seconds,
    }
    rows.append(row)
    lz.rows = rows + [done[t.name] for t in lz.zoo.tasks[i + 1 :] if t.name in done]
    _write_manifest(lz)
    log(
      f"[{i + 1}/{len(lz.tasks)}] {task.name}: LoRA {row['lora_acc']:.3f}, head without adapter "
      f"{row['head_without_adapter_acc']:.3f}, majority {row['majority_acc']:.3f} ({seconds:.1f} s)"
    )
  lz.rows = rows
  _write_manifest(lz)
  log(f"zoo of {len(rows)} tasks in {directory} ({time.perf_counter() - start_all:.0f} s)")
  return lz


def zlib_hash(name: str) -> int:
  return zlib.crc32(name.encode()) & 0x7FFFFFFF


def read_zoo_adapter(lz: LoadedZoo, name: str, directory: Path | None = None):
  """(LoRA tree, head) of a PEFT adapter dir (default: the zoo's own adapter of ``name``)."""
  a = peft_io.read_adapter(
    directory or lz.adapter_dir(name), scheme=SCHEME, params=lz.backbone.params
  )
  return a.lora, (from_peft_head(a.heads) if a.heads else None)


def read_zoo(lz: LoadedZoo) -> tuple[list[str], dict, dict]:
  """(task names in zoo order, {name: LoRA tree}, {name: head}) of the zoo's own adapters."""
  names = [t.name for t in lz.zoo.tasks]
  originals, heads = {}, {}
  for n in names:
    originals[n], heads[n] = read_zoo_adapter(lz, n)
  return names, originals, heads


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
  """The zoo's training flags (``--seed --lr --epochs --head --init``), for every CLI that
  trains one."""
  parser.add_argument("--seed", type=int, default=0, help="the zoo's seed (tasks, splits, inits)")
  parser.add_argument("--lr", type=float, default=None, help="the zoo's Adam step (default 1e-2)")
  parser.add_argument(
    "--epochs", type=int, default=None, help="the zoo's epochs (default 5, --quick 4)"
  )
  parser.add_argument(
    "--head",
    default="trained",
    choices=HEAD_MODES,
    help="task heads trained with the LoRA, or frozen (fixed random: only the LoRA learns)",
  )
  parser.add_argument(
    "--init",
    default="task",
    choices=INIT_MODES,
    help="each LoRA initialised from its task's seed, or shared (one init for every task)",
  )


def with_training_arguments(s: Settings, args: argparse.Namespace) -> Settings:
  return dataclasses.replace(
    s,
    seed=args.seed,
    lr=args.lr or s.lr,
    epochs=args.epochs or s.epochs,
    head=args.head,
    init=args.init,
  )


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--kind", default="text", choices=("text", "fashion"))
  parser.add_argument("--quick", action="store_true")
  add_training_arguments(parser)
  parser.add_argument(
    "--backbone", default=None, choices=("efficientnet",), help="fashion only (default: vit)"
  )
  args = parser.parse_args(argv)
  if args.backbone and args.kind != "fashion":
    parser.error("--backbone is for --kind fashion")
  make = Settings.quick if args.quick else Settings.full
  train_zoo(with_training_arguments(make(args.kind, backbone=args.backbone), args), args.out)


if __name__ == "__main__":
  main()
