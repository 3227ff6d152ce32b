"""Data layer: tfds builders over local files, and the continual-learning task sequences."""

import gzip
import re

import numpy as np
import pytest

from share_jax.experiments import data
from share_jax.experiments.data import bbc_news, fashion_mnist, sources, tweet_sentiment

BBC_PER_CLASS = 12
TWEETS_PER_CELL = 12  # per (domain, label)
DOMAIN_TEXT = {
  "airline": "@united flight {i} was {label}",
  "apple": "my new iphone {i} is {label}",
  "coachella": "#coachella day {i} feels {label}",
  "self_driving": "a driverless car {i} is {label}",
  "other": "#deflategate take {i}: {label}",
}


def write_bbc(root, classes=bbc_news.CLASS_NAMES, per_class=BBC_PER_CLASS):
  for c in classes:
    (root / c).mkdir(parents=True)
    for i in range(per_class):
      (root / c / f"{i + 1:03d}.txt").write_text(f"  {c} headline {i}\n\n{c} body {i}.\n")
  return root


def write_tweets(path, rows=None):
  if rows is None:
    rows = [
      (label, "" if domain == "coachella" else "0.9", DOMAIN_TEXT[domain].format(i=i, label=label))
      for domain in DOMAIN_TEXT
      for label in tweet_sentiment.LABEL_NAMES
      for i in range(TWEETS_PER_CELL)
    ]
  lines = ["sentiment,confidence,text"] + [f'{s},{c},"{t}"' for s, c, t in rows]
  path.write_text("\n".join(lines) + "\n")
  return path


def write_idx(path, array):
  header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def write_fashion(root, n_train=8, n_test=4):
  """Per class n_train/n_test random images; returns {split: (images, labels)}."""
  root.mkdir(parents=True)
  rng = np.random.default_rng(0)
  arrays = {}
  for split, n in (("train", n_train), ("t10k", n_test)):
    labels = np.tile(np.arange(10, dtype=np.uint8), n)
    images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
    write_idx(root / f"{split}-images-idx3-ubyte.gz", images)
    write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    arrays["test" if split == "t10k" else split] = (images, labels)
  return arrays


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
  """Fake sources for all three builders and one data_dir that caches their builds."""
  root = tmp_path_factory.mktemp("fake")
  return {
    "bbc": write_bbc(root / "bbc"),
    "tweets": write_tweets(root / "tweets.csv"),
    "fashion": root / "fashion",
    "fashion_arrays": write_fashion(root / "fashion"),
    "data_dir": root / "tfds",
  }


# Builders on fake data.


def test_bbc_builder(tmp_path):
  src = write_bbc(tmp_path / "src")
  (src / "business" / "999.txt").write_bytes(b"Price \xa3600m\n")  # a cp1252 byte
  builder = data.BbcNews(src, data_dir=tmp_path / "tfds")
  columns = data.load(builder)
  assert builder.info.version == "1.0.0"
  assert builder.info.features["label"].names == list(bbc_news.CLASS_NAMES)
  assert list(columns) == ["train"]
  train = columns["train"]
  assert train["label"].tolist() == [0] * (BBC_PER_CLASS + 1) + sorted([1, 2, 3, 4] * BBC_PER_CLASS)
  assert train["text"][0] == "business headline 0\n\nbusiness body 0."
  assert "Price £600m" in train["text"]
  assert (tmp_path / "tfds" / "bbc_news" / "1.0.0").is_dir()


def test_bbc_builder_rejects_unknown_class_folder(tmp_path):
  write_bbc(tmp_path / "src", classes=("business", "weather"))
  with pytest.raises(ValueError, match="weather"):
    data.load(data.BbcNews(tmp_path / "src", data_dir=tmp_path / "tfds"))


def test_tweet_builder_domains_and_features(tmp_path):
  rows = [
    ("negative", "0.5", "@JetBlue lost my bag &amp; more http://t.co/x"),
    ("neutral", "", "Apple maps in driverless cars"),  # self-driving wins over apple
    ("positive", "1.0", "iOS update is great"),
    ("neutral", "0.7", "COACHELLA lineup"),
    ("negative", "0.6", "#DeflateGate again"),
  ]
  builder = data.TweetSentiment(write_tweets(tmp_path / "t.csv", rows), data_dir=tmp_path)
  train = data.load(builder)["train"]
  features = builder.info.features
  assert features["label"].names == ["negative", "neutral", "positive"]
  assert features["domain"].names == list(tweet_sentiment.DOMAIN_NAMES)
  assert train["text"] == [t for _, _, t in rows]
  assert train["label"].tolist() == [0, 1, 2, 1, 0]
  domains = [features["domain"].names[d] for d in train["domain"]]
  assert domains == ["airline", "self_driving", "apple", "coachella", "other"]
  np.testing.assert_allclose(train["confidence"], [0.5, np.nan, 1.0, 0.7, 0.6])


def test_tweet_builder_rejects_missing_columns(tmp_path):
  (tmp_path / "t.csv").write_text("label,text\npositive,hi\n")
  with pytest.raises(ValueError, match="confidence"):
    data.load(data.TweetSentiment(tmp_path / "t.csv", data_dir=tmp_path / "tfds"))


def test_fashion_builder(fake):
  builder = data.FashionMnistLocal(fake["fashion"], data_dir=fake["data_dir"])
  columns = data.load(builder)
  assert builder.info.features["label"].names == list(fashion_mnist.CLASS_NAMES)
  assert sorted(columns) == ["test", "train"]
  for split, (images, labels) in fake["fashion_arrays"].items():
    assert columns[split]["image"].dtype == np.uint8
    np.testing.assert_array_equal(columns[split]["image"], images)  # source order is kept
    np.testing.assert_array_equal(columns[split]["label"], labels)


def test_read_idx_rejects_other_files(tmp_path):
  with gzip.open(tmp_path / "x.gz", "wb") as f:
    f.write(b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd")  # float32 IDX
  with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
    data.read_idx(tmp_path / "x.gz")


def test_prepared_data_is_reused_without_the_source(tmp_path):
  src = write_bbc(tmp_path / "src", per_class=2)
  data.load(data.BbcNews(src, data_dir=tmp_path / "tfds"))
  for path in sorted(src.rglob("*.txt")):
    path.unlink()
  assert len(data.load(data.BbcNews(src, data_dir=tmp_path / "tfds"))["train"]["text"]) == 10


def test_default_data_dir(monkeypatch, tmp_path):
  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
  assert data.default_data_dir().parts[-3:] == (".cache", "share_jax", "tfds")
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
  assert data.default_data_dir() == tmp_path
  data.load(data.BbcNews(write_bbc(tmp_path / "src", per_class=1)))
  assert (tmp_path / "bbc_news" / "1.0.0" / "dataset_info.json").is_file()


@pytest.mark.parametrize("cls", [data.BbcNews, data.TweetSentiment, data.FashionMnistLocal])
def test_missing_source_names_the_install_command(cls, tmp_path):
  with pytest.raises(FileNotFoundError, match=re.escape(sources.INSTALL[cls.name])) as info:
    data.load(cls(tmp_path / "absent", data_dir=tmp_path))
  assert str(tmp_path / "absent") in str(info.value)


def test_missing_fashion_file_names_the_install_command(tmp_path):
  write_fashion(tmp_path / "src")
  (tmp_path / "src" / "t10k-labels-idx1-ubyte.gz").unlink()
  with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
    data.load(data.FashionMnistLocal(tmp_path / "src", data_dir=tmp_path))


@pytest.mark.parametrize(
  ("cls", "module"), [(data.BbcNews, bbc_news), (data.TweetSentiment, tweet_sentiment)]
)
def test_missing_package_names_the_install_command(cls, module, monkeypatch, tmp_path):
  monkeypatch.setattr(module, "package_dir", lambda _: None)
  with pytest.raises(
    FileNotFoundError, match=re.escape(f"install it with: {sources.INSTALL[cls.name]}")
  ):
    data.load(cls(data_dir=tmp_path))


# Tasks on fake data.


def text_sequence(fake, **kwargs):
  kwargs = dict(n_train_per_class=6, n_test_per_class=3, seed=0) | kwargs
  return data.text_domain_sequence(
    data_dir=fake["data_dir"], bbc_source=fake["bbc"], tweets_source=fake["tweets"], **kwargs
  )


def assert_balanced(task, n_train, n_test):
  c = task.num_classes
  assert task.y_train.dtype == task.y_test.dtype == np.int32
  assert np.bincount(task.y_train, minlength=c).tolist() == [n_train] * c
  assert np.bincount(task.y_test, minlength=c).tolist() == [n_test] * c


def assert_same(a, b):
  assert a.name == b.name and a.class_names == b.class_names and a.class_ids == b.class_ids
  for x, y in ((a.x_train, b.x_train), (a.x_test, b.x_test), (a.y_train, b.y_train)):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(a.y_test, b.y_test)


def test_text_domain_sequence(fake):
  tasks = text_sequence(fake)
  names = ["bbc_topic", "airline_sentiment", "apple_sentiment"]
  assert [t.name for t in tasks] == names + ["coachella_sentiment", "other_sentiment"]
  assert tasks[0].class_names == bbc_news.CLASS_NAMES and tasks[0].class_ids == (0, 1, 2, 3, 4)
  for task in tasks:
    assert_balanced(task, 6, 3)
    assert isinstance(task.x_train, list) and isinstance(task.x_train[0], str)
    assert not set(task.x_train) & set(task.x_test)
  for task, domain in zip(tasks[1:], ["airline", "apple", "coachella", "other"], strict=True):
    assert task.class_names == ("negative", "neutral", "positive")
    prefix = DOMAIN_TEXT[domain].split(" ")[0]
    assert all(x.startswith(prefix) for x in task.x_train + task.x_test)
    for x, y in zip(task.x_train, task.y_train, strict=True):
      assert x.endswith(task.class_names[y])  # the label follows its text


def test_text_domain_sequence_is_deterministic(fake):
  a, b = text_sequence(fake), text_sequence(fake)
  for ta, tb in zip(a, b, strict=True):
    assert_same(ta, tb)
  other = text_sequence(fake, seed=1)
  assert any(set(ta.x_train) != set(tc.x_train) for ta, tc in zip(a, other, strict=True))


def test_test_sample_does_not_depend_on_the_train_size(fake):
  small, large = text_sequence(fake, n_train_per_class=2), text_sequence(fake)
  for ts, tl in zip(small, large, strict=True):
    assert sorted(ts.x_test) == sorted(tl.x_test)
    assert set(ts.x_train) < set(tl.x_train)


def test_text_domains_can_be_chosen(fake):
  tasks = text_sequence(fake, domains=("self_driving",))
  assert [t.name for t in tasks] == ["bbc_topic", "self_driving_sentiment"]
  with pytest.raises(ValueError, match="'cars'"):
    text_sequence(fake, domains=("cars",))


def test_too_few_examples_names_task_and_class(fake):
  with pytest.raises(ValueError, match=r"task 'bbc_topic': class 'business' has 12 examples"):
    text_sequence(fake, n_train_per_class=10)


def test_duplicates_are_dropped_before_sampling(tmp_path):
  rows = [
    (label, "0.9", f"@united {label} {i}")
    for label in ("negative", "neutral", "positive")
    for i in range(4)
  ]
  rows += [("negative", "0.9", "@united negative 0")] * 5  # copies
  rows += [("negative", "0.9", "@united same"), ("positive", "0.9", "@united same")]  # ambiguous
  tweets = write_tweets(tmp_path / "t.csv", rows)
  kwargs = dict(data_dir=tmp_path, bbc_source=write_bbc(tmp_path / "bbc"), tweets_source=tweets)
  kwargs |= dict(domains=("airline",), seed=0)
  task = data.text_domain_sequence(3, 1, **kwargs)[1]
  assert sorted(task.x_train + task.x_test) == sorted({t for _, _, t in rows} - {"@united same"})
  with pytest.raises(ValueError, match="class 'negative' has 4 examples"):
    data.text_domain_sequence(4, 1, **kwargs)


def test_tweets_are_cleaned(tmp_path):
  rows = [
    (label, "0.9", f"@united  {label} &amp; http://t.co/{i} ok")
    for label in ("negative", "neutral", "positive")
    for i in range(2)
  ]
  tweets = write_tweets(tmp_path / "t.csv", rows)
  task = data.text_domain_sequence(
    1,
    0,
    data_dir=tmp_path,
    bbc_source=write_bbc(tmp_path / "bbc"),
    tweets_source=tweets,
    domains=("airline",),
  )[1]
  assert sorted(task.x_train) == [
    "@united negative & ok",
    "@united neutral & ok",
    "@united positive & ok",
  ]
  assert data.clean_tweet(" a\n www.x.com  b https://t.co ") == "a b"


def test_bbc_class_incremental(fake):
  kwargs = dict(n_train_per_class=5, n_test_per_class=4, data_dir=fake["data_dir"])
  tasks = data.bbc_class_incremental(source=fake["bbc"], **kwargs)
  assert [t.name for t in tasks] == [
    "bbc_business_tech",
    "bbc_politics_entertainment",
    "bbc_sports",
  ]
  assert [t.class_ids for t in tasks] == [(0, 4), (2, 1), (3,)]
  assert [t.class_names for t in tasks] == [
    ("business", "tech"),
    ("politics", "entertainment"),
    ("sports",),
  ]
  for task in tasks:
    assert_balanced(task, 5, 4)
    assert not set(task.x_train) & set(task.x_test)
    for x, y in zip(task.x_test, task.y_test, strict=True):
      assert x.startswith(task.class_names[y])
  # A class draws the same examples here as in the 5-way topic task.
  topic = data.text_domain_sequence(
    5,
    4,
    data_dir=fake["data_dir"],
    bbc_source=fake["bbc"],
    tweets_source=fake["tweets"],
    domains=(),
  )[0]
  tech = np.array(topic.x_test)[topic.y_test == 4]
  assert sorted(tech) == sorted(np.array(tasks[0].x_test)[tasks[0].y_test == 1])


def test_bbc_class_incremental_rejects_bad_splits(fake):
  with pytest.raises(ValueError, match="'sport'"):
    data.bbc_class_incremental([["sport"]], source=fake["bbc"], data_dir=fake["data_dir"])
  with pytest.raises(ValueError, match="more than one task"):
    data.bbc_class_incremental([["tech"], ["tech"]], source=fake["bbc"], data_dir=fake["data_dir"])


def test_missing_class_names_task_and_class(tmp_path):
  bbc = write_bbc(tmp_path / "bbc", classes=("business", "politics", "sports"))
  with pytest.raises(ValueError, match=r"task 'bbc_business_tech': class 'tech' has 0 examples"):
    data.bbc_class_incremental(
      n_train_per_class=2, n_test_per_class=1, data_dir=tmp_path, source=bbc
    )


def test_split_fashion_mnist(fake):
  kwargs = dict(n_train_per_class=5, n_test_per_class=3, seed=7, data_dir=fake["data_dir"])
  tasks = data.split_fashion_mnist(source=fake["fashion"], **kwargs)
  assert [t.name for t in tasks] == [f"fashion_{2 * k}_{2 * k + 1}" for k in range(5)]
  train_images, train_labels = fake["fashion_arrays"]["train"]
  test_images, test_labels = fake["fashion_arrays"]["test"]
  train_rows = {img.tobytes(): y for img, y in zip(train_images, train_labels, strict=True)}
  test_rows = {img.tobytes(): y for img, y in zip(test_images, test_labels, strict=True)}
  for k, task in enumerate(tasks):
    assert task.class_ids == (2 * k, 2 * k + 1)
    assert task.class_names == fashion_mnist.CLASS_NAMES[2 * k : 2 * k + 2]
    assert task.x_train.shape == (10, 28, 28) and task.x_train.dtype == np.uint8
    assert_balanced(task, 5, 3)
    for images, labels, rows in (
      (task.x_train, task.y_train, train_rows),
      (task.x_test, task.y_test, test_rows),
    ):
      assert [rows[img.tobytes()] for img in images] == [task.class_ids[y] for y in labels]
  again = data.split_fashion_mnist(source=fake["fashion"], **kwargs)
  for a, b in zip(tasks, again, strict=True):
    assert_same(a, b)


def test_split_fashion_mnist_too_few_test_examples(fake):
  with pytest.raises(ValueError, match=r"task 'fashion_0_1': class 't-shirt/top' has 4 .*test"):
    data.split_fashion_mnist(2, 5, source=fake["fashion"], data_dir=fake["data_dir"])


def test_task_validates_its_labels():
  y = np.zeros(2, np.int32)
  data.Task("t", ["a", "b"], y, ["c", "d"], y, ("x",))
  with pytest.raises(ValueError, match="task 't': test"):
    data.Task("t", ["a", "b"], y, ["c"], y, ("x",))
  with pytest.raises(ValueError, match="int32"):
    data.Task("t", ["a", "b"], y + 1, ["c", "d"], y, ("x",))
  with pytest.raises(ValueError, match="class_ids"):
    data.Task("t", ["a", "b"], y, ["c", "d"], y, ("x",), class_ids=(0, 1))


# The real assets (skipped where they are not installed).


def real_source(cls):
  path = cls().default_source()
  if path is None or not path.exists():
    pytest.skip(f"{cls.name} asset not installed: {sources.INSTALL[cls.name]}")


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("real_tfds")


def test_real_bbc_news(real_dir):
  real_source(data.BbcNews)
  train = data.load(data.BbcNews(data_dir=real_dir))["train"]
  assert len(train["text"]) == 2225
  assert np.bincount(train["label"]).tolist() == [510, 386, 417, 511, 401]
  tasks = data.bbc_class_incremental(data_dir=real_dir)
  assert [len(t.x_train) for t in tasks] == [400, 400, 200]


def test_real_tweet_sentiment(real_dir):
  real_source(data.TweetSentiment)
  real_source(data.BbcNews)
  train = data.load(data.TweetSentiment(data_dir=real_dir))["train"]
  counts = {
    name: np.bincount(train["label"][train["domain"] == d], minlength=3).tolist()
    for d, name in enumerate(tweet_sentiment.DOMAIN_NAMES)
  }
  assert counts == {  # the table in offline_assets.md
    "airline": [9176, 3099, 2363],
    "apple": [1199, 2014, 414],
    "coachella": [552, 924, 2276],
    "self_driving": [104, 4144, 447],
    "other": [5155, 4837, 1454],
  }
  tasks = data.text_domain_sequence(data_dir=real_dir)
  assert [len(t.x_train) for t in tasks] == [1000, 600, 600, 600, 600]
  assert [len(t.x_test) for t in tasks] == [500, 300, 300, 300, 300]


def test_real_fashion_mnist(real_dir):
  real_source(data.FashionMnistLocal)
  tasks = data.split_fashion_mnist(data_dir=real_dir)  # builds, then loads all 70000 once
  splits = data.FashionMnistLocal(data_dir=real_dir).info.splits
  assert {name: split.num_examples for name, split in splits.items()} == {
    "train": 60000,
    "test": 10000,
  }
  assert [t.x_train.shape for t in tasks] == [(1000, 28, 28)] * 5
  assert [t.x_test.shape for t in tasks] == [(400, 28, 28)] * 5
