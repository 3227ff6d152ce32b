"""GLUE from the standard local folder layout: one ``Task`` per benchmark task, dev set as test.

The folder is what ``download_glue_data.py`` writes (``DATA_DIR/CoLA/train.tsv``, ``dev.tsv``, …);
nothing is downloaded. Each task keeps its real quirks:

- CoLA: no header; columns source, label, original judgement, sentence. Matthews correlation.
- SST-2: header ``sentence  label``. Accuracy.
- MRPC: header ``Quality  #1 ID  #2 ID  #1 String  #2 String`` (train.tsv may start with a UTF-8
  BOM); sentence pairs. Accuracy (or F1, ``metrics={"MRPC": "f1"}``).
- RTE, QNLI: ``index  sentence1  sentence2  label`` / ``index  question  sentence  label``, labels
  ``entailment`` / ``not_entailment``; sentence pairs. Accuracy.
- STS-B: ten columns, ``sentence1``, ``sentence2`` and a float ``score`` in [0, 5]; a regression
  head. Pearson (or Spearman).

STS-B, RTE and QNLI rows may carry extra tab-separated fields (a few real rows do); their label
is then the last field, as GLUE's reference processors read it.

Pairs are ``(first, second)`` tuples in ``Task.x_*``; a backbone's tokenizer joins them with its
separator. Files are read as GLUE's processors do: tab-separated, no quoting (sentences contain
quote marks), rows with the wrong number of fields are errors naming file and line.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from share_jax.errors import ShareError
from share_jax.experiments.data import Task

PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class GlueSpec:
  """Where one task's fields are: by header name, or by position when ``header`` is False."""

  folder: str
  text: tuple[str | int, ...]  # one column (single sentence) or two (a pair)
  label: str | int
  classes: tuple[str, ...]  # label values in the file, in class order; () for regression
  class_names: tuple[str, ...]
  metric: str
  header: bool = True
  columns: int | None = None  # the number of fields every row must have (headerless files)
  ragged: bool = False  # rows may carry extra fields; the label is then the last one


SPECS = {
  "CoLA": GlueSpec(
    "CoLA", (3,), 1, ("0", "1"), ("unacceptable", "acceptable"), "matthews", False, 4
  ),
  "MRPC": GlueSpec(
    "MRPC",
    ("#1 String", "#2 String"),
    "Quality",
    ("0", "1"),
    ("not_equivalent", "equivalent"),
    "accuracy",
  ),
  "RTE": GlueSpec(
    "RTE",
    ("sentence1", "sentence2"),
    "label",
    ("entailment", "not_entailment"),
    ("entailment", "not_entailment"),
    "accuracy",
    ragged=True,
  ),
  "STS-B": GlueSpec(
    "STS-B", ("sentence1", "sentence2"), "score", (), ("similarity",), "pearson", ragged=True
  ),
  "QNLI": GlueSpec(
    "QNLI",
    ("question", "sentence"),
    "label",
    ("entailment", "not_entailment"),
    ("entailment", "not_entailment"),
    "accuracy",
    ragged=True,
  ),
  "SST-2": GlueSpec(
    "SST-2", ("sentence",), "label", ("0", "1"), ("negative", "positive"), "accuracy"
  ),
}
# The paper's order (Share, arXiv 2602.06043, GLUE table: T-0 … T-5).
PAPER_SEQUENCE = ("CoLA", "MRPC", "RTE", "STS-B", "QNLI", "SST-2")


def read_tsv(path: Path, spec: GlueSpec) -> tuple[list, np.ndarray]:
  """(texts or (first, second) pairs, labels: int32 class indices or float32 scores)."""
  if not path.is_file():
    raise ShareError(f"GLUE {spec.folder}: missing {path}")
  lines = path.read_text(encoding="utf-8-sig").splitlines()
  rows = [line.split("\t") for line in lines if line.strip()]
  if spec.header:
    if not rows:
      raise ShareError(f"{path}: empty file (expected a header line)")
    header, rows, first = rows[0], rows[1:], 2
    missing = [c for c in (*spec.text, spec.label) if c not in header]
    if missing:
      raise ShareError(f"{path}: header {header} lacks the column(s) {missing}")
    index = {name: header.index(name) for name in (*spec.text, spec.label)}
    width = len(header)
  else:
    index, width, first = {c: c for c in (*spec.text, spec.label)}, spec.columns, 1
  texts, labels = [], []
  for n, row in enumerate(rows, first):
    if len(row) < width or (len(row) > width and not spec.ragged):
      raise ShareError(f"{path}, line {n}: {len(row)} tab-separated fields, expected {width}")
    fields = tuple(row[index[c]] for c in spec.text)
    texts.append(fields[0] if len(fields) == 1 else fields)
    labels.append(_label(row[-1 if len(row) > width else index[spec.label]], spec, path, n))
  if not texts:
    raise ShareError(f"{path}: no examples")
  dtype = np.int32 if spec.classes else np.float32
  return texts, np.asarray(labels, dtype)


def _label(value: str, spec: GlueSpec, path: Path, line: int) -> int | float:
  if not spec.classes:
    try:
      return float(value)
    except ValueError:
      raise ShareError(f"{path}, line {line}: score {value!r} is not a number") from None
  if value not in spec.classes:
    raise ShareError(f"{path}, line {line}: label {value!r} is not one of {list(spec.classes)}")
  return spec.classes.index(value)


def subsample(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
  """Up to ``n`` row indices (all when ``n`` is 0): for classes, balanced round-robin over a
  random permutation of each class, so a small sample holds every class; else uniform."""
  order = rng.permutation(len(y))
  if not n or n >= len(y):
    return np.sort(order)
  if y.dtype.kind == "f":
    return np.sort(order[:n])
  position = np.empty(len(y))
  for c in np.unique(y):
    rows = order[y[order] == c]
    position[rows] = np.arange(len(rows))
  return np.sort(order[np.argsort(position[order], kind="stable")[:n]])


def glue_task(
  data_dir: PathLike,
  name: str,
  *,
  max_train: int = 0,
  max_test: int = 0,
  seed: int = 0,
  metric: str | None = None,
) -> Task:
  """One GLUE task: train.tsv for training, dev.tsv (labelled) as the test split; ``max_*``
  subsample (0 keeps all)."""
  if name not in SPECS:
    raise ShareError(f"unknown GLUE task {name!r}; known: {list(SPECS)}")
  spec = SPECS[name]
  folder = Path(data_dir) / spec.folder
  if not folder.is_dir():
    raise ShareError(f"GLUE {name}: no folder {folder} (expected {Path(data_dir)}/{spec.folder}/)")
  metric = metric or spec.metric
  rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
  splits = []
  for split, n in (("train", max_train), ("dev", max_test)):
    x, y = read_tsv(folder / f"{split}.tsv", spec)
    rows = subsample(y, n, rng)
    splits += [[x[i] for i in rows], y[rows]]
  try:
    return Task(name, *splits, class_names=spec.class_names, metric=metric)
  except ValueError as e:
    raise ShareError(f"GLUE {name} with metric {metric!r}: {e}") from None


def glue_sequence(
  data_dir: PathLike | None,
  tasks: Sequence[str] = PAPER_SEQUENCE,
  *,
  max_train: int = 0,
  max_test: int = 0,
  seed: int = 0,
  metrics: Mapping[str, str] | None = None,
) -> list[Task]:
  """The GLUE tasks in order (default: the paper's CoLA → MRPC → RTE → STS-B → QNLI → SST-2);
  ``metrics`` overrides a task's score (e.g. ``{"MRPC": "f1", "STS-B": "spearman"}``)."""
  if not data_dir:
    raise ShareError(
      "GLUE needs its data folder: pass --config.data_dir=/path/to/glue_data (the folder with "
      f"{', '.join(SPECS)} as written by download_glue_data.py)"
    )
  if not Path(data_dir).is_dir():
    raise ShareError(f"GLUE data_dir {data_dir} does not exist or is not a folder")
  metrics = dict(metrics or {})
  unknown = sorted(set(metrics) - set(tasks))
  if unknown:
    raise ShareError(f"metrics given for GLUE tasks {unknown} that are not in {list(tasks)}")
  absent = [t for t in tasks if t in SPECS and not (Path(data_dir) / SPECS[t].folder).is_dir()]
  if absent:
    raise ShareError(f"GLUE data_dir {data_dir} lacks the task folder(s) {absent}")
  return [
    glue_task(data_dir, t, max_train=max_train, max_test=max_test, seed=seed, metric=metrics.get(t))
    for t in tasks
  ]
