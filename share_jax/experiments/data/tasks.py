"""Continual-learning task sequences: seeded, class-balanced, disjoint train/test samples."""

from __future__ import annotations

import dataclasses
import html
import re
import zlib
from collections.abc import Sequence

import numpy as np

from share_jax.experiments import metrics
from share_jax.experiments.data import bbc_news, fashion_mnist, tweet_sentiment
from share_jax.experiments.data.builder import PathLike, load

BBC_CLASS_INCREMENTAL = (("business", "tech"), ("politics", "entertainment"), ("sports",))
TEXT_DOMAINS = ("airline", "apple", "coachella", "other")
FASHION_SPLITS = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
_URL = re.compile(r"https?://\S*|www\.\S+")


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
  """One task: inputs and labels 0..C-1 local to the task.

  ``x_*``: a list of str (text) or a uint8 array (N, 28, 28) (images); ``y_*``: int32 (N,).
  ``class_ids[k]``: local class k's label in the source dataset (None: k itself).
  ``metric``: how the task is scored (``share_jax.experiments.metrics.TASK_METRICS``); a
  regression metric means float32 labels and one class name (the predicted quantity).
  """

  name: str
  x_train: list[str] | np.ndarray
  y_train: np.ndarray
  x_test: list[str] | np.ndarray
  y_test: np.ndarray
  class_names: tuple[str, ...]
  class_ids: tuple[int, ...] | None = None
  metric: str = "accuracy"

  def __post_init__(self):
    c = len(self.class_names)
    if metrics.is_regression(self.metric):
      for split, x, y in (
        ("train", self.x_train, self.y_train),
        ("test", self.x_test, self.y_test),
      ):
        y = np.asarray(y)
        if c != 1 or len(x) != len(y) or y.dtype != np.float32 or not np.isfinite(y).all():
          raise ValueError(f"task {self.name!r}: {split} needs one finite float32 target per input")
      return
    if self.class_ids is not None and len(self.class_ids) != c:
      raise ValueError(f"task {self.name!r}: {len(self.class_ids)} class_ids for {c} classes")
    for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
      y = np.asarray(y)
      if len(x) != len(y) or y.dtype != np.int32 or np.any((y < 0) | (y >= c)):
        raise ValueError(f"task {self.name!r}: {split} needs one int32 label in [0, {c}) per input")

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def clean_tweet(text: str) -> str:
  """HTML entities decoded, URLs dropped, whitespace collapsed."""
  return " ".join(_URL.sub(" ", html.unescape(text)).split())


def text_domain_sequence(
  n_train_per_class: int = 200,
  n_test_per_class: int = 100,
  seed: int = 0,
  data_dir: PathLike | None = None,
  *,
  domains: Sequence[str] = TEXT_DOMAINS,
  bbc_source: PathLike | None = None,
  tweets_source: PathLike | None = None,
) -> list[Task]:
  """BBC topic (5-way), then 3-way sentiment per tweet domain (airline, apple, coachella, other).

  Duplicate texts are dropped before sampling (and texts seen with two labels altogether).
  """
  unknown = sorted(set(domains) - set(tweet_sentiment.DOMAIN_NAMES))
  if unknown:
    raise ValueError(f"unknown tweet domains {unknown}; known: {tweet_sentiment.DOMAIN_NAMES}")
  sizes = (n_train_per_class, n_test_per_class)
  tasks = [_bbc_pool(bbc_source, data_dir).task("bbc_topic", range(5), *sizes, seed)]
  tweets = load(tweet_sentiment.TweetSentiment(tweets_source, data_dir=data_dir))["train"]
  for domain in domains:
    rows = np.flatnonzero(tweets["domain"] == tweet_sentiment.DOMAIN_NAMES.index(domain))
    texts = [clean_tweet(tweets["text"][i]) for i in rows]
    pool = _text_pool(f"{domain} tweets", texts, tweets["label"][rows], tweet_sentiment.LABEL_NAMES)
    tasks.append(pool.task(f"{domain}_sentiment", range(3), *sizes, seed))
  return tasks


def bbc_class_incremental(
  splits: Sequence[Sequence[str]] = BBC_CLASS_INCREMENTAL,
  n_train_per_class: int = 200,
  n_test_per_class: int = 100,
  seed: int = 0,
  data_dir: PathLike | None = None,
  *,
  source: PathLike | None = None,
) -> list[Task]:
  """One task per group of BBC topics; ``class_ids`` are the 5-way BBC labels."""
  flat = [c for group in splits for c in group]
  unknown = sorted(set(flat) - set(bbc_news.CLASS_NAMES))
  if unknown:
    raise ValueError(f"unknown BBC classes {unknown}; known: {bbc_news.CLASS_NAMES}")
  if len(set(flat)) != len(flat):
    raise ValueError(f"a BBC class is in more than one task: {splits}")
  bbc = _bbc_pool(source, data_dir)
  return [
    bbc.task(
      "bbc_" + "_".join(group),
      [bbc_news.CLASS_NAMES.index(c) for c in group],
      n_train_per_class,
      n_test_per_class,
      seed,
    )
    for group in splits
  ]


def split_fashion_mnist(
  n_train_per_class: int = 500,
  n_test_per_class: int = 200,
  seed: int = 0,
  data_dir: PathLike | None = None,
  *,
  splits: Sequence[Sequence[int]] = FASHION_SPLITS,
  source: PathLike | None = None,
) -> list[Task]:
  """Split Fashion-MNIST (default 5 tasks × 2 classes); test examples come from the test split."""
  data = load(fashion_mnist.FashionMnistLocal(source, data_dir=data_dir))
  train, test = (
    _Pool(f"fashion-mnist {s}", data[s]["image"], data[s]["label"], fashion_mnist.CLASS_NAMES)
    for s in ("train", "test")
  )
  tasks = []
  for group in splits:
    name = "fashion_" + "_".join(map(str, group))
    (train_rows,) = train.draw(name, group, [n_train_per_class], seed)
    (test_rows,) = test.draw(name, group, [n_test_per_class], seed)
    tasks.append(_task(name, train, train_rows, test, test_rows, group, seed))
  return tasks


@dataclasses.dataclass(frozen=True, eq=False)
class _Pool:
  """Labelled examples that tasks draw classes from; ``name`` also seeds the draws."""

  name: str
  x: list[str] | np.ndarray
  y: np.ndarray
  class_names: tuple[str, ...]

  def draw(self, task: str, classes, sizes, seed: int) -> list[list[np.ndarray]]:
    """For each size, one row array per class: consecutive slices of a seeded permutation.

    The permutation depends on (seed, pool, class) only, so slices are disjoint and a class
    gets the same examples in every task that draws it from this pool.
    """
    out = [[] for _ in sizes]
    for c in classes:
      rows = np.flatnonzero(self.y == c)
      if len(rows) < sum(sizes):
        raise ValueError(
          f"task {task!r}: class {self.class_names[c]!r} has {len(rows)} examples in "
          f"{self.name}, needs {sum(sizes)}"
        )
      rows = np.random.default_rng([seed, zlib.crc32(self.name.encode()), c]).permutation(rows)
      for k, start in enumerate(np.cumsum([0, *sizes[:-1]])):
        out[k].append(rows[start : start + sizes[k]])
    return out

  def task(self, name: str, classes, n_train: int, n_test: int, seed: int) -> Task:
    """Train and test both from this pool; the test slice comes first, so it does not depend
    on ``n_train``."""
    test, train = self.draw(name, classes, [n_test, n_train], seed)
    return _task(name, self, train, self, test, classes, seed)


def _bbc_pool(source: PathLike | None, data_dir: PathLike | None) -> _Pool:
  bbc = load(bbc_news.BbcNews(source, data_dir=data_dir))["train"]
  return _text_pool("bbc news", bbc["text"], bbc["label"], bbc_news.CLASS_NAMES)


def _text_pool(name: str, texts: list[str], labels: np.ndarray, class_names) -> _Pool:
  """A pool with one copy of each text; a text seen with two labels is dropped altogether."""
  first: dict[str, int] = {}
  ambiguous = set()
  for i, text in enumerate(texts):
    if labels[first.setdefault(text, i)] != labels[i]:
      ambiguous.add(text)
  keep = sorted(i for text, i in first.items() if text not in ambiguous)
  return _Pool(name, [texts[i] for i in keep], labels[keep], tuple(class_names))


def _task(name, train: _Pool, train_rows, test: _Pool, test_rows, classes, seed) -> Task:
  """A task with local labels 0..C-1 (the order of ``classes``), each split shuffled."""
  rng = np.random.default_rng([seed, zlib.crc32(name.encode())])

  def take(pool: _Pool, per_class):
    rows = np.concatenate(per_class)
    y = np.repeat(np.arange(len(per_class), dtype=np.int32), [len(r) for r in per_class])
    order = rng.permutation(len(rows))
    rows, y = rows[order], y[order]
    return ([pool.x[i] for i in rows] if isinstance(pool.x, list) else pool.x[rows]), y

  x_train, y_train = take(train, train_rows)
  x_test, y_test = take(test, test_rows)
  ids = tuple(int(c) for c in classes)
  names = tuple(train.class_names[c] for c in ids)
  return Task(name, x_train, y_train, x_test, y_test, names, ids)
