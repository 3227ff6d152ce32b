"""A zoo of many small, real classification tasks for the "Lots of LoRAs" experiment.

Every task draws its classes from **cells**: one (source, label) bucket of deduplicated items,
e.g. ``bbc/business`` or ``tweet/airline/negative`` or ``fashion/3``. A task class is one cell
(a BBC topic pair) or several (one-vs-rest: "rest" = the other cells, drawn evenly). Each cell is
permuted once by the seed and cut into a test region (its first ``n_test`` items) and a train
region (the next ``n_train``), so a test item of one task is never a training item of another,
and tasks that share a cell share examples (their features are computed once).

Items are indices into the zoo's ``universe`` (texts, or uint8 images (N, 28, 28)).

Text zoo (109 tasks, ``text_zoo``): BBC topics (10 pairs, 10 triples, 5 quadruples, the 5-way
task, 5 one-vs-rest), tweet sentiment per domain (5 domains × [3-way, 3 pairs, 3 one-vs-rest]),
3-way sentiment on each pair of domains (10) and on all domains (+ 3 pairs, 3 one-vs-rest),
tweet domain identification (10 pairs, 10 triples, the 5-way task, 5 one-vs-rest).
Vision zoo (100 tasks, ``fashion_zoo``): Fashion-MNIST class pairs (45), one-vs-rest (10) and 45
of the 120 triples (seeded); train items from the train split, test items from the test split.
"""

from __future__ import annotations

import dataclasses
import html
import itertools
import re
import zlib
from collections.abc import Sequence

import numpy as np

from share_jax.experiments.data import bbc_news, fashion_mnist, tweet_sentiment
from share_jax.experiments.data.builder import PathLike, load

SENTIMENTS = tweet_sentiment.LABEL_NAMES
DOMAINS = tweet_sentiment.DOMAIN_NAMES
_URL = re.compile(r"https?://\S*|www\.\S+")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A task: ``classes`` = ((class name, (cell, …)), …); local label = position."""

  name: str
  family: str
  classes: tuple[tuple[str, tuple[str, ...]], ...]

  @property
  def num_classes(self) -> int:
    return len(self.classes)


@dataclasses.dataclass(frozen=True, eq=False)
class ZooTask:
  """A drawn task: universe indices (N,) and int32 labels (N,) per split."""

  spec: TaskSpec
  train: np.ndarray
  y_train: np.ndarray
  test: np.ndarray
  y_test: np.ndarray

  @property
  def name(self) -> str:
    return self.spec.name

  @property
  def majority_accuracy(self) -> float:
    """Test accuracy of always predicting the most frequent test label."""
    return float(np.bincount(self.y_test).max() / len(self.y_test))


@dataclasses.dataclass(frozen=True, eq=False)
class Zoo:
  """``universe``: list of str or uint8 (N, 28, 28), only the items some task uses."""

  kind: str
  universe: list[str] | np.ndarray
  tasks: list[ZooTask]


def clean_text(text: str) -> str:
  """HTML entities decoded, URLs dropped, whitespace collapsed."""
  return " ".join(_URL.sub(" ", html.unescape(text)).split())


def _one_vs_rest(family: str, prefix: str, groups: dict[str, tuple[str, ...]]) -> list[TaskSpec]:
  names = list(groups)
  return [
    TaskSpec(
      f"{prefix}_{n}_vs_rest",
      family,
      ((n, groups[n]), ("rest", tuple(c for m in names if m != n for c in groups[m]))),
    )
    for n in names
  ]


def _combos(family: str, prefix: str, groups: dict[str, tuple[str, ...]], sizes) -> list[TaskSpec]:
  out = []
  for size in sizes:
    for combo in itertools.combinations(groups, size):
      name = f"{prefix}_" + "_".join(combo)
      out.append(TaskSpec(name, family, tuple((n, groups[n]) for n in combo)))
  return out


def text_specs() -> list[TaskSpec]:
  """The 109 text tasks (module docstring)."""
  topics = {c: (f"bbc/{c}",) for c in bbc_news.CLASS_NAMES}
  specs = _combos("bbc_topic", "bbc", topics, (2, 3, 4, 5))
  specs += _one_vs_rest("bbc_topic", "bbc", topics)
  for d in DOMAINS:
    cells = {s: (f"tweet/{d}/{s}",) for s in SENTIMENTS}
    specs += _combos("tweet_sentiment", f"sent_{d}", cells, (3, 2))
    specs += _one_vs_rest("tweet_sentiment", f"sent_{d}", cells)
  for pair in itertools.combinations(DOMAINS, 2):
    cells = {s: tuple(f"tweet/{d}/{s}" for d in pair) for s in SENTIMENTS}
    specs += _combos("tweet_sentiment_mixed", "sent_" + "+".join(pair), cells, (3,))
  pooled = {s: tuple(f"tweet/{d}/{s}" for d in DOMAINS) for s in SENTIMENTS}
  specs += _combos("tweet_sentiment_mixed", "sent_all", pooled, (3, 2))
  specs += _one_vs_rest("tweet_sentiment_mixed", "sent_all", pooled)
  domains = {d: tuple(f"tweet/{d}/{s}" for s in SENTIMENTS) for d in DOMAINS}
  specs += _combos("tweet_domain", "domain", domains, (2, 3, 5))
  specs += _one_vs_rest("tweet_domain", "domain", domains)
  return specs


def fashion_specs(seed: int = 0) -> list[TaskSpec]:
  """The 100 Fashion-MNIST tasks: all pairs, all one-vs-rest, 45 seeded triples."""
  classes = {f"{i}": (f"fashion/{i}",) for i in range(10)}
  specs = _combos("fashion_pair", "fashion", classes, (2,))
  specs += _one_vs_rest("fashion_ovr", "fashion", classes)
  triples = _combos("fashion_triple", "fashion", classes, (3,))
  pick = np.random.default_rng([seed, 3]).choice(len(triples), 45, replace=False)
  return specs + [triples[i] for i in sorted(pick)]


def _dedup(texts: Sequence[str], keys: Sequence) -> dict:
  """``{key: [text, …]}`` with one copy per text; a text seen under two keys is dropped."""
  first: dict[str, object] = {}
  ambiguous = set()
  for text, key in zip(texts, keys, strict=True):
    if first.setdefault(text, key) != key:
      ambiguous.add(text)
  out: dict = {}
  for text, key in first.items():
    if text not in ambiguous:
      out.setdefault(key, []).append(text)
  return out


def _permuted(items: Sequence, seed: int, name: str) -> list:
  order = np.random.default_rng([seed, zlib.crc32(name.encode())]).permutation(len(items))
  return [items[i] for i in order]


def text_cells(
  seed: int, data_dir: PathLike | None = None
) -> tuple[list[str], dict[str, list[int]]]:
  """Universe of deduplicated texts and, per cell, its seeded permutation (universe indices)."""
  bbc = load(bbc_news.BbcNews(data_dir=data_dir))["train"]
  tweets = load(tweet_sentiment.TweetSentiment(data_dir=data_dir))["train"]
  groups = _dedup(
    [clean_text(t) for t in bbc["text"]], [f"bbc/{bbc_news.CLASS_NAMES[y]}" for y in bbc["label"]]
  )
  groups |= _dedup(
    [clean_text(t) for t in tweets["text"]],
    [
      f"tweet/{DOMAINS[d]}/{SENTIMENTS[y]}"
      for y, d in zip(tweets["label"], tweets["domain"], strict=True)
    ],
  )
  universe: list[str] = []
  cells = {}
  for name in sorted(groups):
    texts = _permuted(sorted(groups[name]), seed, name)
    cells[name] = list(range(len(universe), len(universe) + len(texts)))
    universe += texts
  return universe, cells


def fashion_cells(seed: int, data_dir: PathLike | None = None):
  """Universe = train then test images; per cell (train perm, test perm) of universe indices."""
  data = load(fashion_mnist.FashionMnistLocal(data_dir=data_dir))
  train, test = data["train"], data["test"]
  universe = np.concatenate([train["image"], test["image"]]).reshape(-1, 28, 28)
  n = len(train["label"])
  cells = {}
  for c in range(10):
    tr = np.flatnonzero(train["label"] == c)
    te = n + np.flatnonzero(test["label"] == c)
    cells[f"fashion/{c}"] = (_permuted(list(tr), seed, f"tr{c}"), _permuted(list(te), seed, f"{c}"))
  return universe.astype(np.uint8), cells


def _quota(n: int, parts: int) -> list[int]:
  return [n // parts + (i < n % parts) for i in range(parts)]


def draw(
  spec: TaskSpec, cells: dict[str, tuple[np.ndarray, np.ndarray]], n_train: int, n_test: int, seed
) -> ZooTask:
  """Balanced splits: ``n_train``/``n_test`` per class, a multi-cell class split evenly over its
  cells (each cell's first items); both splits shuffled by (seed, task name)."""
  rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
  out = []
  for split, n in ((0, n_train), (1, n_test)):
    rows, labels = [], []
    for label, (_, class_cells) in enumerate(spec.classes):
      for cell, q in zip(class_cells, _quota(n, len(class_cells)), strict=True):
        pool = cells[cell][split]
        if len(pool) < q:
          raise ValueError(f"task {spec.name!r}: cell {cell!r} has {len(pool)} items, needs {q}")
        rows.append(np.asarray(pool[:q], np.int64))
        labels.append(np.full(q, label, np.int32))
    rows, labels = np.concatenate(rows), np.concatenate(labels)
    order = rng.permutation(len(rows))
    out += [rows[order], labels[order]]
  return ZooTask(spec, *out)


def _split_regions(perms: dict[str, list[int]], n_train: int, n_test: int):
  """One permutation per cell → (train region, test region): test first, then train."""
  return {
    c: (np.asarray(p[n_test : n_test + n_train]), np.asarray(p[:n_test])) for c, p in perms.items()
  }


def _compact(universe, tasks: list[ZooTask]):
  """Keep only the universe items some task uses (so features are computed for those only)."""
  used = np.unique(np.concatenate([np.concatenate([t.train, t.test]) for t in tasks]))
  remap = np.full(len(universe), -1, np.int64)
  remap[used] = np.arange(len(used))
  small = [universe[i] for i in used] if isinstance(universe, list) else universe[used]
  return small, [dataclasses.replace(t, train=remap[t.train], test=remap[t.test]) for t in tasks]


def build_zoo(
  kind: str,
  *,
  n_train: int,
  n_test: int,
  seed: int = 0,
  max_tasks: int | None = None,
  data_dir: PathLike | None = None,
) -> Zoo:
  """The ``kind`` ("text" or "fashion") zoo in a seeded task order (so any prefix mixes
  families); ``max_tasks`` keeps an evenly spaced subset of that order (quick runs)."""
  if kind == "text":
    universe, perms = text_cells(seed, data_dir)
    cells = _split_regions(perms, n_train, n_test)
    specs = text_specs()
  elif kind == "fashion":
    universe, perms = fashion_cells(seed, data_dir)
    cells = {
      c: (np.asarray(tr[:n_train]), np.asarray(te[:n_test])) for c, (tr, te) in perms.items()
    }
    specs = fashion_specs(seed)
  else:
    raise ValueError(f"unknown zoo kind {kind!r}; known: text, fashion")
  order = np.random.default_rng([seed, 17]).permutation(len(specs))
  specs = [specs[i] for i in order]
  if max_tasks is not None and max_tasks < len(specs):
    specs = [specs[i] for i in np.linspace(0, len(specs) - 1, max_tasks).round().astype(int)]
  tasks = [draw(s, cells, n_train, n_test, seed) for s in specs]
  universe, tasks = _compact(universe, tasks)
  return Zoo(kind, universe, tasks)
