"""The Lots-of-LoRAs zoo and benchmark: task construction, and the quick mode end to end at tiny
size (random tiny BERT on the real text data; skipped where the data packages are missing)."""

import itertools

import numpy as np
import pytest

from benchmarks import lots_of_loras
from share_jax import peft_io
from share_jax.experiments import zoo, zoo_train
from share_jax.experiments.data import bbc_news, sources, tweet_sentiment
from share_jax.lora import LoRA, lora_leaves
from share_jax.paths import nest


def test_text_and_fashion_specs_are_distinct_and_cover_the_zoo():
  text, fashion = zoo.text_specs(), zoo.fashion_specs(seed=0)
  assert len(text) == 109 and len(fashion) == 100
  for specs in (text, fashion):
    assert len({s.name for s in specs}) == len(specs)
    # No two tasks ask the same question (same classes made of the same cells).
    keys = {tuple(sorted(cells for _, cells in s.classes)) for s in specs}
    assert len(keys) == len(specs)
    for s in specs:
      cells = [c for _, cs in s.classes for c in cs]
      assert len(cells) == len(set(cells)) and s.num_classes >= 2
  assert zoo.fashion_specs(seed=0) == fashion


def test_draw_is_balanced_disjoint_and_deterministic():
  cells = {
    f"c{i}": (np.arange(100 * i, 100 * i + 60), np.arange(100 * i + 60, 100 * i + 90))
    for i in range(4)
  }
  spec = zoo.TaskSpec("t", "f", (("a", ("c0",)), ("rest", ("c1", "c2", "c3"))))
  t = zoo.draw(spec, cells, n_train=10, n_test=7, seed=3)
  assert np.bincount(t.y_train).tolist() == [10, 10] and np.bincount(t.y_test).tolist() == [7, 7]
  assert not set(t.train) & set(t.test)
  rest = t.train[t.y_train == 1]
  assert sorted(len(set(rest) & set(cells[c][0])) for c in ("c1", "c2", "c3")) == [3, 3, 4]
  again = zoo.draw(spec, cells, n_train=10, n_test=7, seed=3)
  assert np.array_equal(t.train, again.train) and np.array_equal(t.y_test, again.y_test)
  assert t.majority_accuracy == 0.5
  with pytest.raises(ValueError, match="c0"):
    zoo.draw(spec, cells, n_train=61, n_test=7, seed=3)


def test_feature_cache_is_keyed_by_the_universe_not_its_size(tmp_path):
  """Another seed draws another universe of the same size: its features are encoded afresh."""
  calls = []

  class Backbone:
    name = "fake"

    def encode(self, items):
      calls.append(list(items))
      return {"x": np.asarray([[len(t), ord(t[0])] for t in items])}

  path = tmp_path / "features.npz"
  first, permuted = ["ab", "c", "def"], ["def", "ab", "c"]
  a = zoo_train.encode_universe(Backbone(), first, path)
  assert zoo_train.encode_universe(Backbone(), first, path)["x"].tolist() == a["x"].tolist()
  b = zoo_train.encode_universe(Backbone(), permuted, path)
  assert len(calls) == 2 and b["x"].tolist() == [[3, 100], [2, 97], [1, 99]]
  images = np.arange(8, dtype=np.uint8).reshape(2, 2, 2)
  assert zoo_train.universe_key(images) != zoo_train.universe_key(images[::-1])


def _toy_backbone(rng):
  """A (6 -> 16) ReLU projection as a zoo backbone, its kernel the LoRA target."""
  import jax
  import jax.numpy as jnp

  from share_jax.experiments import backbones

  params = {"params": {"proj": {"kernel": jnp.asarray(rng.normal(size=(6, 16)), jnp.float32)}}}
  return backbones.Backbone(
    "toy",
    params,
    16,
    encode=lambda items: {"x": np.asarray(items, np.float32)},
    features=lambda p, x: jax.nn.relu(x["x"] @ p["params"]["proj"]["kernel"]),
    target=r"proj/kernel$",
  )


def test_frozen_head_is_seeded_per_task_and_never_trained():
  import dataclasses

  import jax

  from share_jax.experiments import fitting

  rng = np.random.default_rng(0)
  backbone = _toy_backbone(rng)
  x, y = {"x": rng.normal(size=(16, 6)).astype(np.float32)}, rng.integers(0, 3, 16).astype(np.int32)
  task = fitting.EncodedTask("t", 3, x, y, x, y)
  s = dataclasses.replace(zoo_train.Settings(), head="frozen", epochs=1, batch_size=8, lr=0.1)
  expected = zoo_train.frozen_head(
    jax.random.fold_in(zoo_train.task_key(s, "t"), 1), backbone.feature_dim, 3
  )
  w = np.asarray(expected["w"])
  np.testing.assert_allclose(w.T @ w, np.eye(3), atol=1e-5)  # orthonormal columns
  lora, head = zoo_train.make_task_trainer(s, backbone)(task, 0)
  np.testing.assert_array_equal(head["w"], expected["w"])
  np.testing.assert_array_equal(head["b"], np.zeros(3))
  assert any(np.abs(np.asarray(v.b)).max() > 0 for v in lora_leaves(lora).values())  # B from 0
  # Deterministic per task seed: the same (zoo seed, task) gives the same head, others differ.
  again = zoo_train.frozen_head(
    jax.random.fold_in(zoo_train.task_key(s, "t"), 1), backbone.feature_dim, 3
  )
  np.testing.assert_array_equal(again["w"], expected["w"])
  for other in (
    zoo_train.task_key(s, "u"),
    zoo_train.task_key(dataclasses.replace(s, seed=1), "t"),
  ):
    head = zoo_train.frozen_head(jax.random.fold_in(other, 1), backbone.feature_dim, 3)
    assert not np.allclose(head["w"], w)
  # A frozen-head zoo never resumes a trained-head zoo (zoo.json written before the mode existed
  # counts as trained).
  old = {k: v for k, v in dataclasses.asdict(zoo_train.Settings()).items() if k != "head"}
  assert zoo_train._same_settings(old, zoo_train.Settings())
  assert not zoo_train._same_settings(old, dataclasses.replace(zoo_train.Settings(), head="frozen"))


def test_shared_init_starts_every_task_from_the_same_lora():
  import dataclasses

  backbone = _toy_backbone(np.random.default_rng(0))

  def initial_a(s, name):
    (leaf,) = lora_leaves(zoo_train.initial_lora(s, backbone, name)).values()
    assert not np.asarray(leaf.b).any()  # B starts at 0 either way
    return np.asarray(leaf.a)

  per_task = zoo_train.Settings()
  shared = dataclasses.replace(per_task, init="shared")
  np.testing.assert_array_equal(initial_a(shared, "t"), initial_a(shared, "u"))
  assert not np.allclose(initial_a(per_task, "t"), initial_a(per_task, "u"))
  # The shared init is the zoo seed's, not any task's; another zoo seed draws another.
  assert not np.allclose(initial_a(shared, "t"), initial_a(per_task, "t"))
  other_seed = dataclasses.replace(shared, seed=1)
  assert not np.allclose(initial_a(shared, "t"), initial_a(other_seed, "t"))
  # A shared-init zoo never resumes a per-task-init one (zoo.json written before the mode
  # existed counts as per-task).
  old = {k: v for k, v in dataclasses.asdict(per_task).items() if k != "init"}
  assert zoo_train._same_settings(old, per_task)
  assert not zoo_train._same_settings(old, shared)
  with pytest.raises(ValueError, match="init mode"):
    zoo_train.initial_lora(dataclasses.replace(per_task, init="bogus"), backbone, "t")
  # Both CLIs carry it into the zoo's settings.
  args = lots_of_loras.parse(["--workdir", "unused", "--init", "shared"])
  assert lots_of_loras.settings_for(args).init == "shared"


def test_truncate_and_delta_error_match_numpy():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(12, 4)), rng.normal(size=(4, 9))
  tree = nest({"k/kernel": LoRA(a.astype(np.float32), b.astype(np.float32))})
  cut = lots_of_loras.truncate(tree, 2)
  w = a @ b
  u, s, vt = np.linalg.svd(w)
  best = (u[:, :2] * s[:2]) @ vt[:2]
  got = lots_of_loras.deltas(cut)["k/kernel"]
  np.testing.assert_allclose(got, best, atol=1e-4)
  err = lots_of_loras.delta_error(cut, {"k/kernel": w})
  np.testing.assert_allclose(err, np.linalg.norm(best - w) / np.linalg.norm(w), rtol=1e-4)
  assert lots_of_loras.delta_error(None, {"k/kernel": w}) == 1.0


def test_conv_adapters_round_trip_and_give_lorashare_equal_linear_loras(tmp_path):
  """EfficientNet zoos: 1×1 conv LoRAs are written as PEFT Conv2d LoRAs and read back equal; the
  Linear copies lorashare gets hold the same ΔW (float64 reference)."""
  rng = np.random.default_rng(0)
  shapes = {
    "params/block_1/expand_conv/kernel": (1, 1, 6, 10),
    "params/head_conv/kernel": (1, 1, 10, 12),
  }
  params = nest({p: np.zeros(s, np.float32) for p, s in shapes.items()})
  flat = {
    p: LoRA(
      rng.normal(size=(s[2], 3)).astype(np.float32), rng.normal(size=(3, s[3])).astype(np.float32)
    )
    for p, s in shapes.items()
  }
  tree = nest(flat)
  assert zoo_train.conv_shapes(params, tree) == shapes
  head = {zoo_train.HEAD: {"kernel": rng.normal(size=(12, 2)), "bias": np.zeros(2)}}
  peft_io.write_adapter(
    tmp_path / "zoo" / "t", tree, scheme=zoo_train.SCHEME, heads=head, kernel_shapes=shapes
  )
  back = peft_io.read_adapter(tmp_path / "zoo" / "t", scheme=zoo_train.SCHEME, params=params)
  assert back.modules["params/head_conv/kernel"] == "head_conv" and back.shapes == shapes
  lz = type("Zoo", (), {"adapter_dir": lambda self, n: tmp_path / "zoo" / n})()
  linear = lots_of_loras.linear_copies(lz, ["t"], tmp_path / "peers")
  copy = peft_io.read_adapter(linear["t"], scheme=zoo_train.SCHEME)
  assert all(len(s) == 2 for s in copy.shapes.values())
  for got in (back.lora, copy.lora):
    for p, w in lots_of_loras.deltas(got).items():
      want = flat[p].a.astype(np.float64) @ flat[p].b.astype(np.float64)
      np.testing.assert_allclose(w, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(
    copy.heads[zoo_train.HEAD]["kernel"], head[zoo_train.HEAD]["kernel"], rtol=1e-6
  )
  # Linear (BERT-style) adapters go to lorashare as they are.
  bert = nest({"params/layer_0/attention/query/kernel": flat["params/head_conv/kernel"]})
  peft_io.write_adapter(tmp_path / "zoo" / "q", bert, scheme=zoo_train.SCHEME)
  assert lots_of_loras.linear_copies(lz, ["q"], tmp_path / "peers") is None


def _need_text_data():
  for cls in (bbc_news.BbcNews, tweet_sentiment.TweetSentiment):
    path = cls().default_source()
    if path is None or not path.exists():
      pytest.skip(f"{cls.name} asset not installed: {sources.INSTALL[cls.name]}")


def test_quick_mode_at_tiny_size(tmp_path):
  _need_text_data()
  args = lots_of_loras.parse(
    ["--workdir", str(tmp_path), "--quick", "--tiny", "--minimal", "--no-plots", "--silent"]
  )
  r = lots_of_loras.run(args)
  n = r["num_tasks"]
  assert n >= 20
  assert set(r["peers"]) == {"lorashare", "vlora"}
  expected = {"lora", "no_adapter", "truncate_r1", "share k=2", "share all at once (ev=0.6)"}
  expected |= {"share one at a time (ev=0.6)"}
  expected |= {"lorashare k=2"} if r["peers"]["lorashare"] == "ok" else set()
  expected |= {"vlora k=2"} if r["peers"]["vlora"] == "ok" else set()
  assert expected <= set(r["methods"])
  keys = {"mean_retention", "min_retention", "bytes", "storage_ratio", "seconds", "per_task"}
  for name, m in r["methods"].items():
    assert keys <= set(m), name
    assert len(m["per_task"]) == n
    assert 0.0 <= m["min_retention"] <= m["mean_retention"] <= 2.0, name
    assert all(0 <= row["agreement"] <= 1 for row in m["per_task"])
  lora = r["methods"]["lora"]
  assert lora["mean_retention"] == 1.0 and lora["storage_ratio"] == 1.0
  assert r["methods"]["no_adapter"]["bytes"] == 0
  share = r["methods"]["share k=2"]
  assert 1.0 < share["storage_ratio"] and share["bytes"] > 0
  assert 0.5 < share["mean_retention"]
  assert [c["absorbed"] for c in r["early_tasks"]["curve"]][-1] == n
  if "lorashare k=2" in r["methods"]:  # same math, same storage formula
    assert r["methods"]["lorashare k=2"]["bytes"] == share["bytes"]
  # The zoo: a PEFT adapter per task, with its head, and its accuracies recorded.
  lz = zoo_train.prepare(zoo_train.Settings.quick("text", tiny=True), tmp_path / "zoo")
  assert len(lz.rows) == n
  for row in lz.rows:
    assert 0 < row["majority_acc"] <= 0.5 and 0 <= row["lora_acc"] <= 1
    adapter = peft_io.read_adapter(lz.adapter_dir(row["name"]), scheme=zoo_train.SCHEME)
    assert adapter.config["r"] == 8 and zoo_train.HEAD in adapter.heads
  names = [row["name"] for row in lz.rows]
  assert len(set(names)) == n and not any(a == b for a, b in itertools.pairwise(names))
