"""Continual-learning methods on one frozen backbone, each with per-task linear heads.

- ``share``: strict Share. Per task: ``begin_task`` → train coefficients + temporary factors +
  head → ``finish_task`` (merge) → fine-tune the new task's coefficients and head in the new basis
  (``task_state``/``set_task``). Old tasks are only re-projected, never trained again.
- ``share_full``: the same, and after each merge every old task's coefficients and head are
  fine-tuned on its own data (needs old data: not strict).
- ``lora_per_task``: an independent LoRA per task (the non-continual upper bound).
- ``lora_sequential``: one LoRA trained on through the sequence (forgetting baseline).
- ``lora_joint``: one LoRA trained on the union of all tasks (multi-task; only a final row).
- ``head_only``: the frozen backbone; linear heads on features computed once.

Share's cold start (``share.cold_start``): ``"data"`` (the default) starts from
``empty_subspace`` and trains the first task through φ temporary factors, exactly like every later
task; ``"lora"`` trains an ordinary LoRA on the first task, builds the subspace from it
(``init_subspace``) and fine-tunes its coefficients, as the official code does. On the text
sequence both reach the same accuracy (ACC 70.5 vs 70.2, forgetting 0.4 vs 0.5, one seed), but
"data" keeps every task strict and equally cheap: no task trains a full LoRA (the "lora" start
trains 100 % of a LoRA on task 1) and the first task stores k × p coefficients, not k × r.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import share_jax as sj
from share_jax.errors import ShareError
from share_jax.experiments import fitting
from share_jax.experiments.backbones import Backbone, batched
from share_jax.experiments.fitting import EncodedTask, Head
from share_jax.lora import apply_lora, lora_leaves


@dataclasses.dataclass
class Cost:
  """Parameter counts per task (lists indexed by task) and shared by all tasks."""

  adapter_trained: list[int] = dataclasses.field(default_factory=list)
  adapter_stored: list[int] = dataclasses.field(default_factory=list)
  head: list[int] = dataclasses.field(default_factory=list)
  shared: int = 0


def head_size(head: Head) -> int:
  return sum(int(np.size(x)) for x in jax.tree.leaves(head))


def lora_factors(lora: Any) -> dict[str, tuple[jax.Array, jax.Array]]:
  """``{kernel path: (a (d_in, r), b (d_out, r))}`` with ΔW = a bᵀ, for ``sj.low_rank_loss``."""
  return {path: (x.a * x.scale, x.b.T) for path, x in lora_leaves(lora).items()}


def lora_size(lora: Any) -> int:
  return sum(int(np.size(x.a)) + int(np.size(x.b)) for x in lora_leaves(lora).values())


class Context:
  """What every method of a run shares: the backbone, the config and jitted functions (so
  methods reuse compilations)."""

  def __init__(self, backbone: Backbone, config, seed: int):
    self.backbone, self.config, self.seed = backbone, config, seed
    self.loss = fitting.classification_loss(backbone.features)
    self.features = jax.jit(backbone.features)
    self.predict = jax.jit(
      lambda params, head, inputs: fitting.logits(head, backbone.features(params, inputs))
    )
    self.lora_optimizer = optax.adam(config.lora.lr)
    self.lora_step = sj.make_step(
      lambda tr, params, batch: sj.low_rank_loss(
        self.loss, params, lora_factors(tr["lora"]), tr["head"], batch
      ),
      self.lora_optimizer,
    )
    self._share_steps: dict = {}
    self._fresh_loras: dict = {}

  def rng(self, *path: int) -> jax.Array:
    key = jax.random.key(self.seed)
    for i in path:
      key = jax.random.fold_in(key, i)
    return key

  def fit(self, step, optimizer, trainable, data, *, epochs: int, desc: str, salt: int = 0):
    """Trains ``trainable`` with a fresh optimizer state on ``data`` (see ``fitting.fit``)."""
    trainable, _ = fitting.fit(
      step,
      trainable,
      optimizer.init(trainable),
      data,
      epochs=epochs,
      batch_size=self.config.train.batch_size,
      seed=self.seed * 7919 + salt,
      desc=desc,
      prepare=self.backbone.prepare,
    )
    return trainable

  def accuracy(self, params: Any, head: Head, task: EncodedTask) -> float:
    batch = self.config.train.eval_batch_size
    return fitting.accuracy(self.predict, params, head, task, batch, self.backbone.prepare)

  def init_head(self, task: EncodedTask) -> Head:
    """Zeros: the adapter and the head learn together (a head warm-started by the probe fits
    small training sets almost exactly and leaves the adapter nothing to learn)."""
    return fitting.zero_head(self.backbone.feature_dim, task.num_classes)

  def train_lora(self, i: int, task: EncodedTask, lora: Any, desc: str) -> tuple[Any, Head]:
    """(LoRA, head) trained on task i; ``lora=None`` starts a fresh LoRA. A fresh LoRA depends
    only on i and the task, so it is trained once per run: per-task LoRA, sequential LoRA's first
    task and Share's LoRA cold start get the same one (for the same task object)."""
    if lora is None:
      cached = self._fresh_loras.get(i)
      if cached is None or cached[0] is not task:
        fresh = sj.init_lora_tree(
          self.backbone.params, self.backbone.target, rank=self.config.lora.rank, rng=self.rng(i)
        )
        self._fresh_loras[i] = task, self.train_lora(i, task, fresh, desc)
      return self._fresh_loras[i][1]
    trainable = {"lora": lora, "head": self.init_head(task)}
    step = bind(self.lora_step, self.backbone.params)
    trainable = self.fit(
      step,
      self.lora_optimizer,
      trainable,
      train_split(task),
      epochs=self.config.train.epochs,
      desc=desc,
      salt=i,
    )
    return trainable["lora"], trainable["head"]

  def share_step(self, kind: str, lr: float, subspace: sj.Subspace):
    """The jitted Share step for ``kind`` ("train" or "finetune"), bound to the subspace's bases."""
    key = (kind, lr, subspace.layout)
    if key not in self._share_steps:
      optimizer = optax.adam(lr)
      self._share_steps[key] = sj.make_train_step(self.loss, optimizer, subspace.layout), optimizer
    step, optimizer = self._share_steps[key]
    return bind(step, self.backbone.params, subspace.bases), optimizer


def train_split(task: EncodedTask) -> list:
  return [(task.x_train, task.y_train, {})]


def bind(step, *args):
  """``step(trainable, opt_state, batch)`` from ``step(trainable, opt_state, *args, batch)``."""

  def bound(trainable, opt_state, batch):
    return step(trainable, opt_state, *args, batch)

  return bound


@functools.partial(jax.jit, static_argnames=("num_classes", "steps", "lr"))
def train_probe(feats: jax.Array, y: jax.Array, *, num_classes: int, steps: int, lr: float) -> Head:
  """A linear head by ``steps`` of full-batch Adam on features (N, H) and labels (N,)."""
  opt = optax.adam(lr)

  def loss(head):
    return fitting.head_loss(fitting.logits(head, feats), y)

  step = sj.make_step(loss, opt)

  def body(carry, _):
    return step(*carry)[:2], None

  head = fitting.zero_head(feats.shape[1], num_classes)
  (head, _), _ = jax.lax.scan(body, (head, opt.init(head)), length=steps)
  return head


class Method:
  """Learns tasks one at a time; ``evaluate(j, task)`` is task j's test accuracy now.

  ``strict``: never trains on an earlier task's data. ``joint``: learns all tasks at once
  (``learn_all``). ``static_old_tasks``: a task's model never changes once learned, so the runner
  may reuse its accuracy instead of evaluating it again.
  """

  name = ""
  strict = True
  joint = False
  static_old_tasks = False

  def __init__(self, ctx: Context):
    self.ctx = ctx
    self.cost = Cost()

  def learn(self, i: int, task: EncodedTask) -> None:
    raise NotImplementedError

  def evaluate(self, j: int, task: EncodedTask) -> float:
    raise NotImplementedError

  def unknown(self, j: int, known) -> ShareError:
    return sj.UnknownTaskError(f"{self.name}: unknown task {j!r}; learned so far: {sorted(known)}")


class HeadOnly(Method):
  """Linear heads on frozen features, computed once per task (full-batch Adam)."""

  name = "head_only"
  static_old_tasks = True

  def __init__(self, ctx):
    super().__init__(ctx)
    self.heads: dict[int, Head] = {}
    self.test_features: dict[int, np.ndarray] = {}

  def frozen_features(self, inputs) -> np.ndarray:
    ctx = self.ctx
    fn = lambda x: ctx.features(ctx.backbone.params, ctx.backbone.prepare(x))  # noqa: E731
    return batched(fn, inputs, ctx.config.train.eval_batch_size)

  def learn(self, i, task):
    feats = jnp.asarray(self.frozen_features(task.x_train))
    probe = self.ctx.config.probe
    head = train_probe(
      feats, jnp.asarray(task.y_train), num_classes=task.num_classes, steps=probe.steps, lr=probe.lr
    )
    self.heads[i] = head
    self.test_features[i] = self.frozen_features(task.x_test)
    self.cost.adapter_trained.append(0)
    self.cost.adapter_stored.append(0)
    self.cost.head.append(head_size(head))

  def evaluate(self, j, task):
    if j not in self.heads:
      raise self.unknown(j, self.heads)
    out = np.asarray(fitting.logits(self.heads[j], self.test_features[j]))
    return fitting.score_outputs(task, out)


class LoRAPerTask(Method):
  name = "lora_per_task"
  static_old_tasks = True

  def __init__(self, ctx):
    super().__init__(ctx)
    self.models: dict[int, tuple[Any, Head]] = {}

  def learn(self, i, task):
    lora, head = self.ctx.train_lora(i, task, None, f"{self.name} {task.name}")
    self.models[i] = lora, head
    self.cost.adapter_trained.append(lora_size(lora))
    self.cost.adapter_stored.append(lora_size(lora))
    self.cost.head.append(head_size(head))

  def evaluate(self, j, task):
    if j not in self.models:
      raise self.unknown(j, self.models)
    lora, head = self.models[j]
    return self.ctx.accuracy(apply_lora(self.ctx.backbone.params, lora), head, task)


class LoRASequential(Method):
  """One LoRA, trained on each task in turn (fresh Adam state and a new head per task)."""

  name = "lora_sequential"

  def __init__(self, ctx):
    super().__init__(ctx)
    self.lora = None
    self.heads: dict[int, Head] = {}

  def learn(self, i, task):
    self.lora, head = self.ctx.train_lora(i, task, self.lora, f"{self.name} {task.name}")
    self.heads[i] = head
    self.cost.adapter_trained.append(lora_size(self.lora))
    self.cost.adapter_stored.append(0)
    self.cost.head.append(head_size(head))
    self.cost.shared = lora_size(self.lora)

  def evaluate(self, j, task):
    if j not in self.heads:
      raise self.unknown(j, self.heads)
    return self.ctx.accuracy(apply_lora(self.ctx.backbone.params, self.lora), self.heads[j], task)


class LoRAJoint(LoRASequential):
  """One LoRA and all heads trained together on the union of the tasks (batches of one task)."""

  name = "lora_joint"
  strict = False
  joint = True

  def learn_all(self, tasks: list[EncodedTask]) -> None:
    ctx = self.ctx
    c_max = max(t.num_classes for t in tasks)
    heads = [pad_head(ctx.init_head(t), c_max) for t in tasks]
    valid = jnp.asarray([[c < t.num_classes for c in range(c_max)] for t in tasks])
    trainable = {
      "lora": sj.init_lora_tree(
        ctx.backbone.params, ctx.backbone.target, rank=ctx.config.lora.rank, rng=ctx.rng(0)
      ),
      "heads": jax.tree.map(lambda *x: jnp.stack(x), *heads),
    }

    def heads_loss(params, heads, batch):
      feats = ctx.backbone.features(params, batch["inputs"])
      w, b = heads["w"][batch["task"]], heads["b"][batch["task"]]
      out = jnp.einsum("bh,bhc->bc", feats, w) + b
      if jnp.issubdtype(batch["y"].dtype, jnp.integer):  # classes beyond the task's: masked
        out = jnp.where(valid[batch["task"]], out, -1e9)
      return fitting.head_loss(out, batch["y"])

    def loss(tr, params, batch):
      return sj.low_rank_loss(heads_loss, params, lora_factors(tr["lora"]), tr["heads"], batch)

    step = bind(sj.make_step(loss, ctx.lora_optimizer), ctx.backbone.params)
    data = [
      (t.x_train, t.y_train, {"task": np.full(len(t.y_train), i)}) for i, t in enumerate(tasks)
    ]
    trainable = ctx.fit(
      step, ctx.lora_optimizer, trainable, data, epochs=ctx.config.train.epochs, desc=self.name
    )
    self.lora = trainable["lora"]
    for i, t in enumerate(tasks):
      head = jax.tree.map(lambda x, i=i, c=t.num_classes: x[i, ..., :c], trainable["heads"])
      self.heads[i] = head
      self.cost.adapter_trained.append(lora_size(self.lora))
      self.cost.adapter_stored.append(0)
      self.cost.head.append(head_size(head))
    self.cost.shared = lora_size(self.lora)


def pad_head(head: Head, num_classes: int) -> Head:
  extra = num_classes - fitting.head_classes(head)
  return {"w": jnp.pad(head["w"], ((0, 0), (0, extra))), "b": jnp.pad(head["b"], (0, extra))}


class Share(Method):
  """Strict Share (``full=False``) or Share-full (old tasks fine-tuned after each merge)."""

  def __init__(self, ctx, full: bool = False):
    super().__init__(ctx)
    self.full = full
    self.name = "share_full" if full else "share"
    self.strict = not full
    self.subspace: sj.Subspace | None = None
    self.seen: dict[int, EncodedTask] = {}

  def subspace_options(self) -> dict:
    c = self.ctx.config.share
    return dict(k=c.k, explained_variance=c.explained_variance, max_k=c.max_k, center=c.center)

  def learn(self, i, task):
    """Everything happens on local copies: ``self.subspace`` changes only if all steps pass."""
    ctx, c = self.ctx, self.ctx.config.share
    sub = self.subspace
    if sub is None and c.cold_start == "lora":
      lora, head = ctx.train_lora(i, task, None, f"{self.name} {task.name} (LoRA)")
      sub = sj.init_subspace(ctx.backbone.params, [lora], task_ids=[i], **self.subspace_options())
      sub = sub.with_head(i, head)
      trained = lora_size(lora)
    else:
      if sub is None:
        sub = sj.empty_subspace(ctx.backbone.params, ctx.backbone.target, **self.subspace_options())
      state = sj.begin_task(sub, i, rng=ctx.rng(i), p=c.p, phi=c.phi, head=ctx.init_head(task))
      step, optimizer = ctx.share_step("train", c.lr, sub)
      state = ctx.fit(
        step,
        optimizer,
        state,
        train_split(task),
        epochs=ctx.config.train.epochs,
        desc=f"{self.name} {task.name}",
        salt=i,
      )
      trained = share_trained_size(sub, state)
      sub = sj.finish_task(sub, state, i)
    sub = self.finetune(sub, i, task, c.finetune_epochs)
    if self.full:
      for j, old in self.seen.items():
        sub = self.finetune(sub, j, old, c.full_finetune_epochs)
    self.subspace = sub
    self.seen[i] = task
    self.cost.adapter_trained.append(trained)
    self.cost.head.append(head_size(sub.heads[i]))
    store = sj.storage(sub)
    self.cost.adapter_stored = [store.coef_params[t] for t in sub.task_ids]
    self.cost.shared = store.basis_params

  def finetune(self, sub: sj.Subspace, j: int, task: EncodedTask, epochs: int) -> sj.Subspace:
    """Task j's coefficients and head trained in the current (frozen) basis."""
    if epochs <= 0:
      return sub
    c = self.ctx.config.share
    step, optimizer = self.ctx.share_step("finetune", c.finetune_lr, sub)
    state = self.ctx.fit(
      step,
      optimizer,
      sj.task_state(sub, j),
      train_split(task),
      epochs=epochs,
      desc=f"{self.name} {task.name} (fine-tune)",
      salt=100 + j,
    )
    return sj.set_task(sub, j, state)

  def evaluate(self, j, task):
    if self.subspace is None:
      raise self.unknown(j, [])
    sub = self.subspace
    params = sj.task_params(self.ctx.backbone.params, sub, j)
    if j not in sub.heads:
      raise ShareError(f"{self.name}: task {j!r} has no stored head; heads: {sorted(sub.heads)}")
    return self.ctx.accuracy(params, sub.heads[j], task)


def share_trained_size(subspace: sj.Subspace, state: sj.TaskState) -> int:
  """Adapter parameters a Share task trains: active coefficients, temporary factors and their
  coefficients (the head not included)."""
  total = 0
  for g, grp in subspace.groups.items():
    n, d, phi = state.temp[g].shape
    p = state.coef[g].shape[-1]
    total += int(np.sum(np.asarray(grp.rank))) * p + n * (d * phi + phi * p)
  return total


METHODS = {
  "head_only": HeadOnly,
  "lora_per_task": LoRAPerTask,
  "lora_sequential": LoRASequential,
  "lora_joint": LoRAJoint,
  "share": Share,
  "share_full": lambda ctx: Share(ctx, full=True),
}
