"""The ``share-jax`` command line (also ``python -m share_jax``): PEFT adapters in, versioned
subspace checkpoints, PEFT adapters out. Every error exits non-zero with one line on stderr."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from share_jax import diagnostics
from share_jax.checkpoint import Checkpointer, CheckpointError, digest
from share_jax.errors import ShareError
from share_jax.fidelity import explained, task_errors
from share_jax.ingest import absorb, init_subspace
from share_jax.lora import lora_leaves
from share_jax.paths import nest
from share_jax.peft_io import SCHEMES, AdapterMeta, PeftAdapter, export_task, read_adapter
from share_jax.storage import storage
from share_jax.subspace import EXPLAINED_OF, Subspace, SubspaceConfig

RUNNER = "share_jax.experiments.run"

PROG = "share-jax"


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):  # one line instead of usage + message
    self.exit(2, f"{self.prog}: error: {message}\n")


# ----------------------------------------------------------------------------- helpers


def _kernel_params(specs: dict[str, tuple[tuple[int, ...], str]]) -> dict:
  """A params stand-in holding only the kernels ``{path: (shape, dtype)}``: zero views that take
  no memory."""
  return nest(
    {p: np.broadcast_to(np.zeros((), dtype), shape) for p, (shape, dtype) in specs.items()}
  )


def _read(dirs: Sequence[str], scheme: str, params: Any = None) -> list[PeftAdapter]:
  out = []
  for i, d in enumerate(dirs, 1):
    out.append(read_adapter(d, scheme=scheme, params=params))
    if sys.stderr.isatty():
      print(
        f"\rreading adapters: {i}/{len(dirs)}", end="\n" if i == len(dirs) else "", file=sys.stderr
      )
  return out


def _task_ids(args, dirs: Sequence[str]) -> list[str]:
  ids = args.task_ids or [Path(d).resolve().name for d in dirs]
  if len(ids) != len(dirs):
    raise ShareError(f"{len(ids)} task ids for {len(dirs)} adapter directories")
  return ids


_CONFIG_FLAGS = (
  "k",
  "explained_variance",
  "explained_of",
  "max_task_error",
  "max_k",
  "center",
  "strict",
)


def _config_options(args) -> dict:
  """The ``SubspaceConfig`` fields given on the command line (the one flag → config mapping)."""
  return {n: getattr(args, n) for n in _CONFIG_FLAGS if getattr(args, n, None) is not None}


def _fidelity_line(subspace: Subspace) -> str:
  errors = task_errors(subspace)
  worst = max(errors, key=errors.get)
  mean = float(np.mean(list(errors.values())))
  return f"worst task ΔW error {errors[worst]:.3g} (task {worst!r}), mean {mean:.3g}"


def _save(ckpt: Checkpointer, subspace: Subspace, ids: Sequence[str], adapters: list) -> int:
  """Save ``subspace`` with the new tasks' heads and PEFT metadata; returns the version."""
  for t, adapter in zip(ids, adapters, strict=True):
    if adapter.heads:
      subspace = subspace.with_head(t, adapter.heads)
  return ckpt.save(
    subspace, task_meta={t: a.task_meta() for t, a in zip(ids, adapters, strict=True)}
  )


def _find_task(task_ids: Sequence[Hashable], text: str) -> Hashable:
  """The task id whose text is ``text`` (ids may be ints or strs)."""
  found = [t for t in task_ids if str(t) == text]
  if len(found) != 1:
    what = "unknown" if not found else "ambiguous"
    raise ShareError(f"{what} task id {text!r}; the checkpoint holds {list(task_ids)}")
  return found[0]


def _existing(ckpt: str) -> Checkpointer:
  checkpointer = Checkpointer(ckpt)
  if not checkpointer.versions():
    raise ShareError(f"no checkpoint versions in {ckpt}")
  return checkpointer


# ----------------------------------------------------------------------------- verbs


def cmd_init(args) -> int:
  with Checkpointer(args.out, max_to_keep=args.max_to_keep) as ckpt:
    if ckpt.versions():
      raise ShareError(f"{args.out} already holds versions {ckpt.versions()}; use absorb")
    ids = _task_ids(args, args.adapters)
    adapters = _read(args.adapters, args.scheme)
    first = lora_leaves(adapters[0].lora)
    params = _kernel_params({p: (adapters[0].shapes[p], "float32") for p in first})
    subspace = init_subspace(
      params, [a.lora for a in adapters], task_ids=ids, **_config_options(args)
    )
    version = _save(ckpt, subspace, ids, adapters)
  print(f"{args.out}: version {version}, {len(ids)} tasks {ids}; {_fidelity_line(subspace)}")
  return 0


def cmd_absorb(args) -> int:
  with _existing(args.ckpt) as ckpt:
    meta = ckpt.metadata()
    subspace = ckpt.restore()
    peft = [AdapterMeta.parse(meta.meta_of(t), f"task {t!r}") for t in meta.task_ids]
    schemes = [m.scheme for m in peft if m is not None]
    scheme = args.scheme or (schemes[0] if schemes else "hf_flax")
    ids = _task_ids(args, args.adapters)
    # kernels and shapes are checked against the subspace's layout by absorb (which names a
    # different set of kernels as such), not against a stand-in holding only the adapted ones
    adapters = _read(args.adapters, scheme)
    loras = [a.lora for a in adapters]  # the restored copy is ours: merge in place
    subspace = absorb(subspace, loras, task_ids=ids, donate=True, **_config_options(args))
    version = _save(ckpt, subspace, ids, adapters)
  print(
    f"{args.ckpt}: version {version}, {subspace.num_tasks} tasks (added {ids}); "
    + _fidelity_line(subspace)
  )
  return 0


def cmd_export(args) -> int:
  ckpt = _existing(args.ckpt)
  meta = ckpt.metadata(args.version)
  subspace = ckpt.restore(args.version)
  task = _find_task(subspace.task_ids, args.task_id)
  config = export_task(
    subspace,
    task,
    args.out,
    meta=meta.meta_of(task),
    scheme=args.scheme,
    prefix=args.prefix,
    head_module=args.head_module,
  )
  print(f"{args.out}: task {task!r} as a PEFT LoRA adapter, r={config['r']}")
  return 0


def _info(ckpt: Checkpointer, version: int | None) -> dict:
  version = ckpt.latest() if version is None else version
  meta = ckpt.metadata(version)
  subspace = ckpt.restore(version)
  held = explained(subspace)
  return {
    "version": version,
    "library_version": meta.library_version,
    "saved_at": meta.saved_at,
    "tasks": list(meta.task_ids),
    "config": dataclasses.asdict(meta.config),
    "base": digest(meta.base) if meta.base else None,
    "ranks": [{**dataclasses.asdict(r), "explained": held[(r.path, r.side)]} for r in meta.ranks],
    "storage": storage(subspace).summary(),
  }


def _diagnostics(ckpt: Checkpointer, version: int | None, directory: str) -> dict:
  """Writes the diagnostic plots and numbers (``share_jax.diagnostics``) into ``directory``."""
  return diagnostics.write_report(ckpt.restore(version), directory)


def _print_diagnostics(numbers: dict, directory: str) -> None:
  print(f"diagnostics in {directory}: explained_variance.png, similarity_*.png, diagnostics.json")
  for fraction, ks in numbers["k_for"].items():
    k = np.asarray(list(ks.values()))
    print(
      f"  k to keep {float(fraction):.0%} of the factor energy: median {np.median(k):g}, "
      f"max {k.max()} over {k.size} kernel sides"
    )
  for measure in diagnostics.MEASURES:
    print(
      f"  task similarity ({measure}), mean off-diagonal {numbers[f'mean_offdiagonal_{measure}']}:"
    )
    for task, row in zip(numbers["tasks"], numbers[f"similarity_{measure}"], strict=True):
      print(f"    {task:>12} " + " ".join(f"{v:5.2f}" for v in row))


def cmd_info(args) -> int:
  ckpt = _existing(args.ckpt)
  info = _info(ckpt, args.version)
  if args.plot:
    info["diagnostics"] = _diagnostics(ckpt, info["version"], args.plot)
  if args.json:
    print(json.dumps(info, indent=2))
    return 0
  s, c = info["storage"], info["config"]
  rule, value = SubspaceConfig(**c).rule
  print(f"version {info['version']} (share_jax {info['library_version']}, {info['saved_at']})")
  print(f"base model: {info['base'] or 'unknown (built from adapters)'}")
  print(f"tasks ({len(info['tasks'])}, in learning order): {info['tasks']}")
  print(
    f"k rule: {rule}={value}, max_k={c['max_k']}, centred={c['center']}, "
    f"max_task_error={c.get('max_task_error')}"
  )
  for r in info["ranks"]:
    print(
      f"  {r['path']} [{r['side']}]: k={r['k']}, energy kept {r['energy']:.3f} (last merge), "
      f"variance explained {r['explained']:.3f} (of all absorbed)"
    )
  print(
    f"task ΔW error (relative, upper bound): worst {s['worst_task_error']:.3g}, "
    f"mean {s['mean_task_error']:.3g}"
  )
  for t, e in s["task_errors"].items():
    print(f"  {t}: {e:.3g}")
  print(
    f"storage: {s['share_bytes']:,} bytes (bases {s['basis_params']:,} params) vs "
    f"{s['lora_bytes']:,} bytes as LoRAs; per task {s['ratio_per_task']:.1f}x smaller, "
    f"{s['ratio_with_bases']:.2f}x with bases"
  )
  if args.plot:
    _print_diagnostics(info["diagnostics"], args.plot)
  return 0


def cmd_versions(args) -> int:
  ckpt = _existing(args.ckpt)
  versions = ckpt.versions()
  for v in versions:
    try:
      meta = ckpt.metadata(v)
      line = f"{len(meta.task_ids)} tasks\t{meta.saved_at}"
    except CheckpointError as e:
      line = f"unreadable: {e}"
    print(f"{v}\t{line}" + ("  (latest)" if v == versions[-1] else ""))
  for name in ckpt.strays():
    print(f"{name}\tignored: a numbered entry that is not a complete version")
  return 0


def cmd_rollback(args) -> int:
  with _existing(args.ckpt) as ckpt:
    dropped = ckpt.rollback(args.version)
  print(f"{args.ckpt}: dropped versions {dropped}; latest is {args.version}")
  return 0


def cmd_run(args) -> int:
  try:
    run = importlib.import_module(RUNNER)
  except ModuleNotFoundError as e:
    if e.name is not None and e.name.startswith("share_jax"):
      raise ShareError(
        f"the continual runner ({RUNNER}) is not available in this version"
      ) from None
    raise ShareError(
      f"the continual runner needs the experiments extra (missing {e.name!r}): "
      "pip install 'share_jax[experiments]'"
    ) from None
  return run.main(["--config", args.config, *args.extra]) or 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog=PROG, description=__doc__.split("\n")[0])
  verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

  def verb(name: str, func, help: str) -> argparse.ArgumentParser:
    p = verbs.add_parser(name, help=help, description=help)
    p.set_defaults(func=func)
    return p

  def k_rule(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--k", type=int, help="keep exactly K basis columns per kernel side")
    g.add_argument("--explained-variance", type=float, metavar="EV", help="energy to keep (0, 1]")
    p.add_argument(
      "--max-task-error",
      type=float,
      metavar="TAU",
      help="smallest k keeping every task's relative ΔW error <= TAU; with --k or "
      "--explained-variance, a threshold that warns when crossed",
    )
    p.add_argument("--strict", action="store_true", default=None, help="fail instead of warning")
    p.add_argument(
      "--center",
      action=argparse.BooleanOptionalAction,
      default=None,
      help="bases from the mean-centred stack plus the mean direction (default) or uncentred",
    )
    p.add_argument("--max-k", type=int, help="cap on k per kernel side")
    p.add_argument(
      "--explained-of",
      choices=EXPLAINED_OF,
      help="EV is a fraction of the stack each merge sees (default, the paper) or of every "
      "column as it was absorbed (what earlier merges dropped counts: order-robust)",
    )

  def adapters(p: argparse.ArgumentParser, scheme_default: str | None) -> None:
    p.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR", help="PEFT LoRA adapter dirs")
    p.add_argument("--task-ids", nargs="+", metavar="ID", help="default: the directory names")
    p.add_argument(
      "--scheme",
      choices=sorted(SCHEMES),
      default=scheme_default,
      help="PEFT module name -> Flax path mapping"
      + (f" (default {scheme_default})" if scheme_default else " (default: the checkpoint's)"),
    )

  p = verb("init", cmd_init, "build a subspace checkpoint from PEFT LoRA adapters")
  adapters(p, "hf_flax")
  p.add_argument("--out", required=True, metavar="CKPT", help="checkpoint directory to create")
  k_rule(p)
  p.add_argument("--max-to-keep", type=int, help="keep only the newest N versions")

  p = verb("absorb", cmd_absorb, "fold PEFT LoRA adapters into a checkpoint (a new version)")
  p.add_argument("ckpt", metavar="CKPT")
  adapters(p, None)
  k_rule(p)

  p = verb("export", cmd_export, "write one task as a PEFT LoRA adapter directory")
  p.add_argument("ckpt", metavar="CKPT")
  p.add_argument("task_id", metavar="TASK_ID")
  p.add_argument("--out", required=True, metavar="DIR", help="new adapter directory")
  p.add_argument("--version", type=int, help="checkpoint version (default: latest)")
  p.add_argument("--scheme", choices=sorted(SCHEMES), help="for tasks not imported from PEFT")
  p.add_argument("--prefix", default="", help="module prefix for --scheme, e.g. 'bert.'")
  p.add_argument("--head-module", help="PEFT module name of a head stored as bare params")

  p = verb("info", cmd_info, "tasks, k per kernel, explained variance and storage")
  p.add_argument("ckpt", metavar="CKPT")
  p.add_argument("--version", type=int, help="default: latest")
  p.add_argument("--json", action="store_true", help="print JSON")
  p.add_argument(
    "--plot", metavar="DIR", help="write explained-variance and task-similarity plots (PNG) here"
  )

  p = verb("versions", cmd_versions, "list the versions of a checkpoint")
  p.add_argument("ckpt", metavar="CKPT")

  p = verb("rollback", cmd_rollback, "drop every version after N")
  p.add_argument("ckpt", metavar="CKPT")
  p.add_argument("version", type=int, metavar="N")

  p = verb("run", cmd_run, "run a continual-learning experiment (share_jax.experiments.run)")
  p.add_argument("--config", required=True, help="experiment config file")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point; returns the exit status."""
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  if extra and args.verb != "run":
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  args.extra = extra
  try:
    return args.func(args)
  except KeyboardInterrupt:
    print(f"{PROG} {args.verb}: interrupted", file=sys.stderr)
    return 130
  except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141
  except Exception as e:  # every failure becomes one line
    message = " ".join(str(e).split()) or type(e).__name__
    if not isinstance(e, ShareError | OSError):
      message = f"{type(e).__name__}: {message}"
    print(f"{PROG} {args.verb}: error: {message}", file=sys.stderr)
    return 1
