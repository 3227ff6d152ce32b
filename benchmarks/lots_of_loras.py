"""Lots of LoRAs: a zoo of real adapters folded into one Share subspace, next to lorashare and
vlora-dev on the same PEFT adapter directories.

    python -m benchmarks.lots_of_loras --workdir DIR [--quick] [--seed N] [--kind text|fashion]
        [--backbone efficientnet] [--zoo-dir ZOO] [--tiny] [--share-k K ...] [--vlora-k K ...]
        [--lr LR] [--epochs N] [--head trained|frozen] [--init task|shared] [--results-md]

Trains the zoo first if ``ZOO`` (default ``DIR/zoo``) has none (``share_jax.experiments.
zoo_train``). Every method turns the zoo's adapters into a stored form and back into one LoRA per
task; each task is evaluated with its own original head through the same JAX path as the
original LoRA. Retention = accuracy / the original LoRA's accuracy (per task); agreement = share
of test predictions equal to the original LoRA's; ΔW error = ‖ΔW' − ΔW‖_F / ‖ΔW‖_F over all
adapted kernels. Bytes count float32 adapter parameters with shared bases included; every method
keeps the heads verbatim, so ``storage_ratio`` compares adapters (original LoRA factors / the
method's bytes) and ``storage_ratio_with_heads`` adds the heads on both sides.

Methods: ``lora`` (the originals, the ceiling), ``no_adapter`` (ΔW = 0, each task's head only),
``truncate_r{1,2}`` (each ΔW cut to rank 1 or 2 by SVD: a same-budget baseline), Share
asynchronously (``init_subspace`` on the first 50 adapters, ``absorb`` the rest in batches of
50) at several fixed k and explained-variance thresholds (of the stack each merge sees, the
paper's reading, and of everything absorbed: ``explained_of="absorbed"``), Share all at once and
one at a time (both readings) for the headline setting, ``lorashare``
(``SHAREModel.from_adapters`` → ``reconstruct`` to PEFT dirs) and ``vlora``
(``SharedSubspace.from_adapters`` → ``reconstruct`` → ``save_adapter``); peers that are not
installed are skipped with a message. On the EfficientNet zoo the adapters are 1×1 Conv2d LoRAs:
vlora reads them as written; lorashare (2-D factors only) gets the equal Linear LoRAs
(``results.json`` ``peer_inputs`` says so). Outputs in DIR: ``results.json``, ``frontier.png``,
``early_tasks.png``, ``per_task.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import share_jax as sj
from benchmarks.results_file import mean_std
from share_jax import peft_io
from share_jax.experiments import zoo_train
from share_jax.lora import LoRA, lora_leaves
from share_jax.paths import nest

BATCH = 50
FLOAT_BYTES = 4
ABSORBED = {"explained_of": "absorbed"}  # explained variance of everything absorbed


@dataclasses.dataclass
class Outcome:
  """One method point: per-task LoRA trees (None = no adapter), bytes, seconds."""

  name: str
  family: str
  loras: dict
  adapter_params: int
  seconds: float
  config: dict


def lora_params(tree) -> int:
  return sum(int(np.size(x.a)) + int(np.size(x.b)) for x in lora_leaves(tree).values())


def deltas(tree) -> dict[str, np.ndarray]:
  return {p: np.asarray(x.delta(), np.float64) for p, x in lora_leaves(tree).items()}


def delta_error(tree, original: dict[str, np.ndarray]) -> float:
  """‖ΔW' − ΔW‖_F / ‖ΔW‖_F over all adapted kernels (ΔW' = 0 for no adapter)."""
  new = deltas(tree) if tree is not None else {p: 0.0 for p in original}
  num = sum(float(np.sum((new[p] - w) ** 2)) for p, w in original.items())
  return float(np.sqrt(num / sum(float(np.sum(w**2)) for w in original.values())))


def truncate(tree, rank: int):
  """Each ΔW cut to its top ``rank`` singular directions (through QR of the factors, so only an
  r × r SVD), balanced between a and b."""
  out = {}
  for p, x in lora_leaves(tree).items():
    qa, ra = np.linalg.qr(np.asarray(x.a, np.float64))
    qb, rb = np.linalg.qr(np.asarray(x.b, np.float64).T * x.scale)
    u, s, vt = np.linalg.svd(ra @ rb.T)
    root = np.sqrt(s[:rank])
    out[p] = LoRA(
      (qa @ (u[:, :rank] * root)).astype(np.float32),
      ((root[:, None] * vt[:rank]) @ qb.T).astype(np.float32),
    )
  return nest(out)


def _timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


# ----------------------------------------------------------------------------- Share


def share_async(params, names, loras, spec: dict, batch: int, on_batch=None):
  """``init_subspace`` on the first ``batch`` adapters, then ``absorb`` in batches of ``batch``;
  ``on_batch(subspace, n_absorbed)`` after each step. Returns (subspace, seconds per step)."""
  kw = dict(spec)
  steps = []
  sub, sec = _timed(
    lambda: jax.block_until_ready(
      sj.init_subspace(params, [loras[n] for n in names[:batch]], task_ids=names[:batch], **kw)
    )
  )
  steps.append(sec)
  if on_batch:
    on_batch(sub, min(batch, len(names)))
  for start in range(batch, len(names), batch):
    chunk = names[start : start + batch]
    sub, sec = _timed(
      lambda chunk=chunk, sub=sub: jax.block_until_ready(
        sj.absorb(sub, [loras[n] for n in chunk], task_ids=chunk)
      )
    )
    steps.append(sec)
    if on_batch:
      on_batch(sub, start + len(chunk))
  return sub, steps


def share_outcome(name: str, family: str, sub, names, seconds: float, spec: dict) -> Outcome:
  st = sj.storage(sub)
  params = st.basis_params + sum(st.coef_params.values())
  loras = {n: sj.reconstruct(sub, n) for n in names}
  ks = sorted({int(k) for g in sub.groups.values() for k in np.asarray(g.rank).ravel()})
  held = list(sj.explained(sub).values())  # variance of all absorbed columns still held
  config = {**spec, "k_range": [ks[0], ks[-1]], "explained": [min(held), float(np.mean(held))]}
  return Outcome(name, family, loras, params, seconds, config)


# ----------------------------------------------------------------------------- peers


def peer_status() -> dict[str, str]:
  """``{peer: "ok" | why it is skipped}``."""
  out = {}
  for peer, module, pip in (
    ("lorashare", "lorashare", "lorashare==0.1.3"),
    ("vlora", "vlora", "vlora-dev==1.0.0"),
  ):
    try:
      __import__(module)
      out[peer] = "ok"
    except Exception as e:  # ImportError, or a broken torch install
      out[peer] = f"not installed ({type(e).__name__}: {e}); pip install {pip}"
  return out


def linear_copies(lz, names, tmp: Path) -> dict[str, Path] | None:
  """The zoo's adapters as Linear LoRAs if they are 1×1 Conv2d LoRAs, else None (use them as
  they are). lorashare stacks 2-D factors only (its ``.T`` on lora_A (r, c_in, 1, 1) breaks);
  a 1×1 conv's lora_A (r, c_in, 1, 1), lora_B (c_out, r, 1, 1) hold exactly the numbers of a
  Linear LoRA (r, c_in), (c_out, r) with the same ΔW (c_in, c_out), so this is no
  approximation; the reconstructions come back as Linear LoRAs and act on the 1×1 kernels."""
  first = peft_io.read_adapter(lz.adapter_dir(names[0]), scheme=zoo_train.SCHEME)
  shapes = first.shapes.values()
  if all(len(shape) == 2 for shape in shapes):
    return None
  if not all(len(shape) == 2 or shape[:2] == (1, 1) for shape in shapes):
    raise ValueError(f"lorashare: convolutions other than 1×1 have no Linear form: {first.shapes}")
  out = {}
  for n in names:
    a = peft_io.read_adapter(lz.adapter_dir(n), scheme=zoo_train.SCHEME)
    out[n] = tmp / "linear" / n
    peft_io.write_adapter(out[n], a.lora, scheme=zoo_train.SCHEME, heads=a.heads)
  return out


def lorashare_outcome(lz, names, k, tmp: Path, linear: dict[str, Path] | None) -> Outcome:
  """``linear``: the Linear copies of 1×1 Conv2d adapters (``linear_copies``), or None."""
  import torch
  from lorashare import SHAREModel

  torch.set_num_threads(1)
  paths = {n: str(linear[n] if linear else lz.adapter_dir(n)) for n in names}
  model, sec = _timed(lambda: SHAREModel.from_adapters(paths, num_components=k))
  params = sum(int(c.numel()) for c in model.components.values())
  params += sum(int(x.numel()) for ld in model.all_loadings.values() for x in ld.values())
  loras = {}
  for n in names:
    out = tmp / f"lorashare_{k}" / n
    model.reconstruct(n, output_dir=out)
    if linear:  # (c_in, r), (r, c_out) factors: no (1, 1, c_in, c_out) kernel shape to check
      loras[n] = peft_io.read_adapter(out, scheme=zoo_train.SCHEME).lora
    else:
      loras[n], _ = zoo_train.read_zoo_adapter(lz, n, out)
  return Outcome(f"lorashare k={k}", "lorashare", loras, params, sec, {"k": k})


def vlora_outcome(lz, names, k, tmp: Path) -> Outcome:
  import torch
  from vlora import SharedSubspace, load_adapter, save_adapter

  torch.set_num_threads(1)
  adapters = [load_adapter(lz.adapter_dir(n)) for n in names]
  sub, sec = _timed(
    lambda: SharedSubspace.from_adapters(adapters, task_ids=names, num_components=k)
  )
  params = int(sub.compression_stats()["total_params_compressed"])
  loras = {}
  for n in names:
    out = tmp / f"vlora_{k}" / n
    save_adapter(sub.reconstruct(n), out)
    loras[n], _ = zoo_train.read_zoo_adapter(lz, n, out)
  return Outcome(f"vlora k={k}", "vlora", loras, params, sec, {"k": k})


# ----------------------------------------------------------------------------- evaluation


class Scorer:
  """Accuracy, retention, agreement and ΔW error of a method's LoRAs, task by task."""

  def __init__(self, lz, names, originals, heads):
    self.lz, self.names, self.heads = lz, names, heads
    self.tasks = {t.name: t for t in lz.tasks}
    self.ev = zoo_train.Evaluator(lz.backbone, eval_batch=lz.settings.n_test)
    self.orig_delta = {n: deltas(originals[n]) for n in names}
    self.orig_pred = {n: self.ev.predictions(originals[n], heads[n], self.tasks[n]) for n in names}
    self.orig_acc = {n: float(np.mean(self.orig_pred[n] == self.tasks[n].y_test)) for n in names}
    self.no_adapter_rows = self.rows({n: None for n in names})
    self.no_adapter_acc = {r["name"]: r["acc"] for r in self.no_adapter_rows}
    self.head_bytes = (
      sum(int(np.size(x)) for n in names for x in jax.tree.leaves(heads[n])) * FLOAT_BYTES
    )

  def rows(self, loras: dict, names=None) -> list[dict]:
    out = []
    for n in names or self.names:
      pred = self.ev.predictions(loras[n], self.heads[n], self.tasks[n])
      acc = float(np.mean(pred == self.tasks[n].y_test))
      out.append(
        {
          "name": n,
          "acc": acc,
          "original_acc": self.orig_acc[n],
          "retention": acc / self.orig_acc[n],
          "agreement": float(np.mean(pred == self.orig_pred[n])),
          "delta_error": delta_error(loras[n], self.orig_delta[n]),
        }
      )
    return out

  def original_rows(self) -> list[dict]:
    """The originals' own rows (no second evaluation needed)."""
    return [
      {
        "name": n,
        "acc": a,
        "original_acc": a,
        "retention": 1.0,
        "agreement": 1.0,
        "delta_error": 0.0,
      }
      for n, a in self.orig_acc.items()
    ]

  def summary(self, o: Outcome, original_bytes: int, rows: list[dict] | None = None) -> dict:
    rows = rows or self.rows(o.loras)
    ret = np.array([r["retention"] for r in rows])
    nbytes = o.adapter_params * FLOAT_BYTES
    gain = sum(self.orig_acc[n] - self.no_adapter_acc[n] for n in self.names)
    kept = sum(r["acc"] - self.no_adapter_acc[r["name"]] for r in rows)
    return {
      "family": o.family,
      "config": o.config,
      "mean_retention": float(ret.mean()),
      "min_retention": float(ret.min()),
      "mean_acc": float(np.mean([r["acc"] for r in rows])),
      "mean_agreement": float(np.mean([r["agreement"] for r in rows])),
      "gain_retained": kept / gain if gain > 0 else None,
      "mean_delta_error": float(np.mean([r["delta_error"] for r in rows])),
      "bytes": nbytes,
      "bytes_with_heads": nbytes + self.head_bytes,
      "storage_ratio": original_bytes / nbytes if nbytes else None,  # None: stores nothing
      "storage_ratio_with_heads": (original_bytes + self.head_bytes) / (nbytes + self.head_bytes),
      "seconds": o.seconds,
      "per_task": rows,
    }


# ----------------------------------------------------------------------------- the experiment


def settings_for(args) -> zoo_train.Settings:
  if args.backbone and args.kind != "fashion":
    raise ValueError("--backbone is for --kind fashion")
  s = (
    zoo_train.Settings.quick(args.kind, tiny=args.tiny, backbone=args.backbone)
    if args.quick
    else zoo_train.Settings.full(args.kind, backbone=args.backbone)
  )
  return zoo_train.with_training_arguments(s, args)


def grid(quick: bool, minimal: bool, d: int, share_k=None, vlora_k=None) -> dict:
  """Settings swept per method (k values capped by the kernel width d); ``minimal``: one point
  per method (tests); ``share_k`` / ``vlora_k``: other k values (Share and lorashare / vlora)."""
  if minimal:
    ks = (2,)
  else:
    ks = [k for k in ((2, 4, 8) if quick else (4, 8, 16)) if k <= d]
  ks = share_k or ks
  return {
    "share_k": ks,
    "share_ev": () if minimal else (0.6, 0.9) if quick else (0.6,),
    "share_tau": (0.3,) if quick else (0.2, 0.35, 0.5),
    "lorashare_k": ks,
    "vlora_k": vlora_k or ((2,) if minimal else (2, 8) if quick else (8, 32)),
    "truncate": (1,) if minimal else (1, 2),
    "headline": {"explained_variance": 0.6},
  }


def run(args) -> dict:
  workdir = Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  s = settings_for(args)
  zoo_dir = Path(args.zoo_dir) if args.zoo_dir else workdir / "zoo"
  log = (lambda *a: print(*a, flush=True)) if not args.silent else (lambda *a: None)
  lz, zoo_seconds = _timed(lambda: zoo_train.train_zoo(s, zoo_dir, log=log))
  names, originals, heads = zoo_train.read_zoo(lz)
  params = lz.backbone.params
  d = min(min(x.a.shape[0], x.b.shape[1]) for x in lora_leaves(originals[names[0]]).values())
  g = grid(args.quick, args.minimal, d, args.share_k, args.vlora_k)
  scorer = Scorer(lz, names, originals, heads)
  original_params = sum(lora_params(originals[n]) for n in names)
  original_bytes = original_params * FLOAT_BYTES
  methods: dict[str, dict] = {}
  tmp = Path(tempfile.mkdtemp(prefix="peers_", dir=workdir))
  batch = args.batch or (8 if args.quick else BATCH)

  def add(o: Outcome, rows=None) -> None:
    methods[o.name] = scorer.summary(o, original_bytes, rows)
    m = methods[o.name]
    log(
      f"{o.name:28s} retention {m['mean_retention']:.4f} (min {m['min_retention']:.3f}) "
      f"gain kept {pct(m['gain_retained'])} agreement {m['mean_agreement']:.3f} "
      f"ΔW err {m['mean_delta_error']:.3f} "
      f"ratio {ratio(m['storage_ratio'])} {m['seconds']:.2f} s"
    )

  add(
    Outcome("lora", "lora", originals, original_params, 0.0, {"rank": s.rank}),
    scorer.original_rows(),
  )
  add(
    Outcome("no_adapter", "no_adapter", {n: None for n in names}, 0, 0.0, {}),
    scorer.no_adapter_rows,
  )
  for r in g["truncate"]:
    loras, sec = _timed(lambda r=r: {n: truncate(originals[n], r) for n in names})
    add(
      Outcome(
        f"truncate_r{r}", "truncate", loras, sum(map(lora_params, loras.values())), sec, {"rank": r}
      )
    )

  # Share, asynchronous in batches of 50: the frontier.
  has_tau = "max_task_error" in {f.name for f in dataclasses.fields(sj.SubspaceConfig)}
  specs = [{"k": k} for k in g["share_k"]]
  specs += [{"explained_variance": ev} for ev in g["share_ev"]]
  specs += [{"explained_variance": ev, **ABSORBED} for ev in g["share_ev"]]
  specs += [{"max_task_error": t} for t in g["share_tau"]] if has_tau else []
  batch_seconds = {}
  for spec in specs:
    sub, steps = share_async(params, names, originals, spec, batch)
    label = "share " + ", ".join(f"{k}={v}" for k, v in spec.items())
    batch_seconds[label] = steps
    add(share_outcome(label, f"share (async, batches of {batch})", sub, names, sum(steps), spec))

  # The headline rule three ways: async batches (with early-task tracking), all at once, one by one.
  head_spec = g["headline"]
  early = names[: min(batch, len(names))]
  curve = []

  def track(sub, n_absorbed):
    rows = scorer.rows({n: sj.reconstruct(sub, n) for n in early}, early)
    curve.append(
      {
        "absorbed": n_absorbed,
        "mean_retention": float(np.mean([r["retention"] for r in rows])),
        "min_retention": float(np.min([r["retention"] for r in rows])),
        "mean_agreement": float(np.mean([r["agreement"] for r in rows])),
        "mean_delta_error": float(np.mean([r["delta_error"] for r in rows])),
      }
    )

  share_async(params, names, originals, head_spec, batch, on_batch=track)
  # The same merges again, now compiled: steady-state seconds of each init/absorb step.
  _, warm = share_async(params, names, originals, head_spec, batch)
  batch_seconds["share ev=0.6 async, warm (compiled)"] = warm
  sub, sec = _timed(lambda: jax.block_until_ready(sj.init_subspace(params, originals, **head_spec)))
  add(
    share_outcome("share all at once (ev=0.6)", "share (all at once)", sub, names, sec, head_spec)
  )
  # One at a time after the first batch, under the paper's reading of explained variance (of the
  # stack each merge sees) and, unless minimal, of everything absorbed (order-robust).
  readings = [("", head_spec)]
  readings += [] if args.minimal else [(", of absorbed", {**head_spec, **ABSORBED})]
  for suffix, spec in readings:
    sub, sec = _timed(
      lambda spec=spec: jax.block_until_ready(
        sj.init_subspace(params, [originals[n] for n in early], task_ids=early, **spec)
      )
    )
    steps = [sec]
    for n in names[len(early) :]:
      sub, sec = _timed(
        lambda n=n, sub=sub: jax.block_until_ready(sj.absorb(sub, [originals[n]], task_ids=[n]))
      )
      steps.append(sec)
    label = f"share one at a time (ev=0.6{suffix})"
    add(share_outcome(label, "share (one at a time)", sub, names, sum(steps), spec))
    batch_seconds[label] = steps

  peers = peer_status()
  linear = linear_copies(lz, names, tmp) if peers["lorashare"] == "ok" else None
  peer_inputs = {
    "lorashare": "Linear copies of the 1×1 Conv2d adapters (exactly equal ΔW)"
    if linear
    else "the zoo's adapter directories",
    "vlora": "the zoo's adapter directories",
  }
  for peer, make, ks in (
    ("lorashare", functools.partial(lorashare_outcome, linear=linear), g["lorashare_k"]),
    ("vlora", vlora_outcome, [k for k in g["vlora_k"] if k < len(names)]),
  ):
    if peers[peer] != "ok":
      log(f"{peer}: skipped, {peers[peer]}")
      continue
    for k in ks:
      add(make(lz, names, k, tmp))
  shutil.rmtree(tmp, ignore_errors=True)

  results = {
    "num_tasks": len(names),
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "machine": f"{platform.machine()}, {jax.device_count()} {jax.default_backend()} device(s)",
    "command": " ".join(["python -m benchmarks.lots_of_loras", *sys.argv[1:]]),
    "zoo": {
      "directory": str(zoo_dir),
      "settings": dataclasses.asdict(s),
      "backbone": lz.backbone.name,
      "families": sorted({r["family"] for r in lz.rows}),
      "train_seconds": float(sum(r["train_seconds"] for r in lz.rows)),
      "mean_majority_acc": float(np.mean([r["majority_acc"] for r in lz.rows])),
      "mean_lora_acc": float(np.mean(list(scorer.orig_acc.values()))),
      "original_adapter_bytes": original_bytes,
      "head_bytes": scorer.head_bytes,
    },
    "peers": peers,
    "peer_inputs": peer_inputs,
    "max_task_error_available": has_tau,
    "methods": methods,
    "early_tasks": {"rule": head_spec, "tasks": len(early), "batch": batch, "curve": curve},
    "step_seconds": batch_seconds,
  }
  (workdir / "results.json").write_text(json.dumps(results, indent=1))
  if not args.no_plots:
    plot_all(results, workdir)
  return results


def pct(x: float | None) -> str:
  return "-" if x is None else f"{100 * x:.0f} %"


def ratio(x: float | None) -> str:
  return "∞ (stores nothing)" if x is None else f"{x:.1f}×"


def plot_all(results: dict, workdir: Path) -> None:
  """frontier.png, early_tasks.png, per_task.png."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  methods = results["methods"]
  families: dict[str, list] = {}
  for m in methods.values():
    families.setdefault(m["family"], []).append(m)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
  for ax, key, label in (
    (axes[0], "mean_retention", "mean retention (%)"),
    (axes[1], "mean_agreement", "agreement with the original LoRA's predictions (%)"),
  ):
    for family, ms in families.items():
      ms = sorted((m for m in ms if m["storage_ratio"]), key=lambda m: m["storage_ratio"])
      if ms:
        x = [m["storage_ratio"] for m in ms]
        ax.plot(x, [100 * m[key] for m in ms], marker="o", label=family)
    if "no_adapter" in methods:
      ax.axhline(100 * methods["no_adapter"][key], color="gray", ls="--", label="no adapter")
    ax.set_xscale("log")
    ax.set_xlabel("storage ratio (all LoRAs / method; bases in, heads out)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0].set_title(f"{results['num_tasks']} tasks: retention vs storage")
  axes[1].set_title("agreement vs storage")
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(workdir / "frontier.png", dpi=110)
  plt.close(fig)

  early = results["early_tasks"]
  fig, ax = plt.subplots(figsize=(5.6, 4))
  xs = [c["absorbed"] for c in early["curve"]]
  ax.plot(xs, [100 * c["mean_retention"] for c in early["curve"]], marker="o", label="mean")
  ax.plot(xs, [100 * c["min_retention"] for c in early["curve"]], marker="v", label="min")
  ax.plot(xs, [100 * c["mean_agreement"] for c in early["curve"]], marker="s", label="agreement")
  ax.set_xlabel("tasks absorbed so far")
  ax.set_ylabel("first-batch tasks (%)")
  ax.set_title(f"first {early['tasks']} tasks, Share {early['rule']}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(workdir / "early_tasks.png", dpi=110)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for family, ms in families.items():
    if family == "lora":
      continue
    # The point of each family nearest a 16× storage ratio (matched storage).
    m = min(ms, key=lambda m: abs(np.log((m["storage_ratio"] or 1e6) / 16)))
    name = next(n for n, x in methods.items() if x is m)
    ret = sorted(100 * r["retention"] for r in m["per_task"])
    ax.plot(ret, label=f"{name} ({ratio(m['storage_ratio'])})", lw=1)
  ax.set_xlabel("task (sorted by retention)")
  ax.set_ylabel("retention (%)")
  ax.grid(alpha=0.3)
  ax.set_title("per-task retention, each method near 16× storage")
  ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(workdir / "per_task.png", dpi=110)
  plt.close(fig)


def table(results: dict) -> str:
  lines = [
    "| method | mean retention | min retention | gain kept | agreement | ΔW error | bytes "
    "| storage ratio | ratio incl. heads | seconds |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, m in results["methods"].items():
    lines.append(
      f"| {name} | {m['mean_retention']:.4f} | {m['min_retention']:.3f} | "
      f"{pct(m['gain_retained'])} | {m['mean_agreement']:.3f} | {m['mean_delta_error']:.3f} | "
      f"{m['bytes']:,} | "
      f"{ratio(m['storage_ratio'])} | {m['storage_ratio_with_heads']:.1f}× | {m['seconds']:.2f} |"
    )
  return "\n".join(lines)


def seeds_table(runs: list[dict]) -> str:
  """Mean ± sd over runs (one per zoo seed) of every method that all of them have."""
  names = [n for n in runs[0]["methods"] if all(n in r["methods"] for r in runs)]

  def ms(name: str, key: str, scale: float = 100.0, spec: str = ".1f") -> str:
    v = [r["methods"][name][key] for r in runs]
    if any(x is None for x in v):
      return "-"
    return mean_std(scale * np.asarray(v, np.float64), spec)

  lines = [
    f"Seeds {[r['zoo']['settings']['seed'] for r in runs]} ({runs[0]['num_tasks']} tasks each); "
    "percent, mean ± sd over seeds.",
    "",
    "| method | mean retention | min retention | gain kept | agreement | storage ratio |",
    "|---|---|---|---|---|---|",
  ]
  for n in names:
    lines.append(
      f"| {n} | {ms(n, 'mean_retention', spec='.2f')} | {ms(n, 'min_retention')} "
      f"| {ms(n, 'gain_retained', spec='.0f')} | {ms(n, 'mean_agreement')} "
      f"| {ms(n, 'storage_ratio', 1.0)}× |"
    )
  return "\n".join(lines) + "\n"


SECTION = "## Lots of LoRAs (issue 9)"


def section(results: dict) -> str:
  """Markdown for ``benchmarks/RESULTS.md``: command, zoo, the table, early tasks, merge times."""
  z = results["zoo"]
  early = results["early_tasks"]
  steps = results["step_seconds"]
  warm = steps.get("share ev=0.6 async, warm (compiled)", [])
  lines = [
    SECTION,
    "",
    f"- command: `{results['command']}`",
    f"- date: {results['date']}; machine: {results['machine']}",
    f"- zoo: {results['num_tasks']} tasks ({', '.join(z['families'])}); backbone "
    f"{z['backbone']}; settings {z['settings']}",
    f"- mean test accuracy: original LoRAs {z['mean_lora_acc']:.3f}; majority class "
    f"{z['mean_majority_acc']:.3f}; zoo training {z['train_seconds']:.0f} s",
    f"- peers: {results['peers']}; inputs: {results.get('peer_inputs')}",
    f"- `max_task_error` available: {results['max_task_error_available']}",
    "",
    table(results),
    "",
    f"Early tasks (the first {early['tasks']}, Share {early['rule']}, absorbed in batches of "
    f"{early['batch']}): "
    + ", ".join(
      f"{c['absorbed']} tasks → retention {c['mean_retention']:.4f} (min {c['min_retention']:.3f}),"
      f" agreement {c['mean_agreement']:.3f}"
      for c in early["curve"]
    ),
    "",
    "Seconds per init/absorb step, compiled (warm): " + ", ".join(f"{x:.3f}" for x in warm),
  ]
  return "\n".join(lines) + "\n"


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--quick", action="store_true", help=">= 20 tasks, few examples (CI)")
  p.add_argument("--tiny", action="store_true", help="with --quick: a random tiny backbone")
  zoo_train.add_training_arguments(p)
  p.add_argument("--kind", default="text", choices=("text", "fashion"))
  p.add_argument(
    "--backbone", default=None, choices=("efficientnet",), help="fashion only (default: vit)"
  )
  p.add_argument("--share-k", type=int, nargs="+", default=None, help="Share / lorashare k")
  p.add_argument("--vlora-k", type=int, nargs="+", default=None, help="vlora k")
  p.add_argument("--zoo-dir", default=None, help="a trained zoo to reuse (default DIR/zoo)")
  p.add_argument("--batch", type=int, default=None, help="absorb batch (default 50; quick 8)")
  p.add_argument("--minimal", action="store_true", help="one point per method (tests)")
  p.add_argument("--no-plots", action="store_true")
  p.add_argument("--silent", action="store_true")
  p.add_argument("--results-md", action="store_true", help="write the RESULTS.md section")
  p.add_argument(
    "--combine",
    nargs="+",
    default=None,
    metavar="RUN_DIR",
    help="no run: mean ± sd over these runs' results.json (one per seed) -> WORKDIR/seeds.md",
  )
  return p.parse_args(argv)


def main(argv=None) -> None:
  args = parse(argv)
  if args.combine:
    text = seeds_table([json.loads((Path(d) / "results.json").read_text()) for d in args.combine])
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    (Path(args.workdir) / "seeds.md").write_text(text)
    print(text)
    return
  results = run(args)
  text = section(results)
  print(text)
  if args.results_md:
    from benchmarks.results_file import write_section

    write_section(SECTION, text)


if __name__ == "__main__":
  main()
