"""Frozen backbones for the continual-learning runner: what a task's inputs are and how features
come out of (possibly adapted) parameters.

A ``Backbone`` bundles

- ``params``: the frozen parameter pytree that adapters (Share, LoRA) act on;
- ``target``: the regex (on "/"-joined key paths) of the kernels they adapt;
- ``encode(raw_x) -> {name: array (N, ...)}``: run once per task, on the host; it may also run a
  frozen prefix of the network (nothing there is adapted, so its output can be cached);
- ``features(params, inputs) -> (B, feature_dim)``: pure and jittable, ``params`` shaped like
  ``Backbone.params`` (the runner passes adapted copies), ``inputs`` a batch of ``encode``'s output,
  after ``prepare``;
- ``prepare(inputs) -> inputs``: host-side, once per batch before ``features`` (default: none);
  the BERT backbones add the indices that pack the batch's real tokens (``bert.pack_tokens``).

Per-task classifier heads (linear on the features) are the runner's business, not the backbone's.

A new backbone is one function returning a ``Backbone``. For a vision model (e.g.
``share_jax.experiments.vision.vit_backbone``): ``params`` = the pretrained ViT's
``{"params": ...}``, ``encode`` = uint8 (N, 28, 28) images → ``{"images": float32 in [0, 1]}``,
``features`` = ``ViT(config).apply(params, inputs["images"])``, ``target`` the ViT's
``attention/(query|value)/kernel``. Missing weights or data should raise ``FileNotFoundError``
naming the install command. ``share_jax.run`` picks backbones by ``config.backbone.name`` and
passes the other ``config.backbone`` fields as keyword arguments.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from share_jax.experiments.models import bert

QUERY_VALUE = r"attention/(query|value)/kernel$"
_ENCODE_BATCH = 64
# Packed-token capacities, as fractions of a batch's B·T slots: a batch takes the smallest that
# holds its real tokens. Each capacity is one more compilation of every step, so only two: tweets
# (26 of 48 tokens on average, 32-tweet batches at most 1,095 of 1,536) fit 2/3.
PACK_FRACTIONS = (2 / 3, 1.0)

Inputs = dict[str, Any]


def batched(fn: Callable[[Inputs], jax.Array], inputs: Inputs, batch_size: int) -> np.ndarray:
  """``fn`` over equal batches of ``inputs`` (at most ``batch_size`` rows, a multiple of 8, the
  last one zero-padded: one compilation per call, little padding), concatenated on the host."""
  n = len(next(iter(inputs.values())))
  count = -(-n // batch_size)
  per_batch = -(-n // count)  # ceil
  size = min(batch_size, -(-per_batch // 8) * 8)
  out = []
  for start in range(0, n, size):
    rows = np.arange(start, min(start + size, n))
    pad = np.concatenate([rows, np.zeros(size - len(rows), int)])
    out.append(np.asarray(fn({k: v[pad] for k, v in inputs.items()}))[: len(rows)])
  return np.concatenate(out)


@dataclasses.dataclass(frozen=True, eq=False)
class Backbone:
  """A frozen feature extractor (see the module docstring)."""

  name: str
  params: Any
  feature_dim: int
  encode: Callable[[Sequence[str] | np.ndarray], Inputs]
  features: Callable[[Any, Inputs], jax.Array]
  target: str = QUERY_VALUE
  prepare: Callable[[Inputs], Inputs] = lambda inputs: inputs


def packed_capacity(tokens: int, slots: int) -> int:
  """The smallest ``PACK_FRACTIONS`` capacity (rows, a multiple of 8 or ``slots``) ≥ tokens."""
  for fraction in PACK_FRACTIONS:
    capacity = min(slots, -(-int(fraction * slots) // 8) * 8)
    if tokens <= capacity:
      return capacity
  return slots


class BertTop(nn.Module):
  """BERT layers ``first .. num_layers - 1`` on cached hidden states, then mean pooling."""

  config: bert.BertConfig
  first: int

  @nn.compact
  def __call__(
    self, hidden: jax.Array, mask: jax.Array, packing: bert.Packing | None = None
  ) -> jax.Array:
    """hidden (B, T, H), mask (B, T) -> (B, H). With ``packing`` the layers run on the real
    tokens only (the attention on (B, T)): the same features to float32 round-off."""
    bias = jnp.where(mask[:, None, None, :] > 0, 0.0, -1e9).astype(hidden.dtype)
    x = hidden if packing is None else bert.pack(hidden, packing)
    for i in range(self.first, self.config.num_layers):
      x = bert.BertLayer(self.config, name=f"layer_{i}")(x, bias, packing)
    return bert.mean_pool(x if packing is None else bert.unpack(x, packing, mask.shape), mask)


def pack_batch(inputs: Inputs) -> Inputs:
  """``inputs`` with ``pack_index`` / ``pack_slot``: ``bert.pack_tokens`` of its ``mask`` at
  the ``packed_capacity`` of its token count, so that ``BertTop`` skips the padding."""
  mask = np.asarray(inputs["mask"])
  packing = bert.pack_tokens(mask, packed_capacity(int(mask.sum()), mask.size))
  return {**inputs, "pack_index": packing.index, "pack_slot": packing.slot}


def packing_of(inputs: Inputs) -> bert.Packing | None:
  """The ``Packing`` that ``pack_batch`` added to ``inputs``, if any."""
  if "pack_index" not in inputs:
    return None
  return bert.Packing(inputs["pack_index"], inputs["pack_slot"])


def bert_backbone(
  name: str,
  config: bert.BertConfig,
  variables: dict,
  tokenize: Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]],
  *,
  frozen_layers: int = 0,
  target: str = QUERY_VALUE,
) -> Backbone:
  """A BERT encoder + mean pooling. The embeddings and the first ``frozen_layers`` layers run once
  in ``encode`` (their hidden states are cached); ``params`` holds only the layers after them."""
  if not 0 <= frozen_layers < config.num_layers:
    raise ValueError(f"frozen_layers={frozen_layers} must be in [0, {config.num_layers})")
  p = variables["params"]
  top_names = [f"layer_{i}" for i in range(frozen_layers, config.num_layers)]
  bottom = {"params": {k: v for k, v in p.items() if k not in top_names}}
  top = {"params": {k: p[k] for k in top_names}}
  prefix = jax.jit(bert.BertEncoder(dataclasses.replace(config, num_layers=frozen_layers)).apply)
  head = BertTop(config, frozen_layers)

  def encode(texts: Sequence[str]) -> Inputs:
    ids, mask = tokenize(texts)
    tokens = {"ids": ids, "mask": mask}
    hidden = batched(lambda x: prefix(bottom, x["ids"], x["mask"]), tokens, _ENCODE_BATCH)
    return {"hidden": hidden, "mask": mask}

  def features(params: Any, inputs: Inputs) -> jax.Array:
    return head.apply(params, inputs["hidden"], inputs["mask"], packing_of(inputs))

  return Backbone(name, top, config.hidden_size, encode, features, target, pack_batch)


def minilm_backbone(max_len: int = 64, frozen_layers: int = 0) -> Backbone:
  """all-MiniLM-L6-v2 (real weights, FileNotFoundError with the install command if missing)."""
  path = bert.minilm_path()
  config, variables = bert.load_bert_params(path)
  tokenizer = bert.load_tokenizer(path)
  return bert_backbone(
    f"minilm_l6(max_len={max_len})",
    config,
    variables,
    lambda texts: bert.tokenize(tokenizer, texts, max_len),
    frozen_layers=frozen_layers,
  )


def hash_tokenize(texts: Sequence[str], vocab_size: int, max_len: int):
  """Lower-cased words hashed into ids 1..vocab_size-1 (0 pads): (ids, mask), int32 (N, max_len).
  Needs no tokenizer files."""
  ids = np.zeros((len(texts), max_len), np.int32)
  for n, text in enumerate(texts):
    words = text.lower().split()[:max_len]
    ids[n, : len(words)] = [1 + zlib.crc32(w.encode()) % (vocab_size - 1) for w in words]
  return ids, (ids > 0).astype(np.int32)


def tiny_bert_backbone(max_len: int = 16, frozen_layers: int = 0, seed: int = 0) -> Backbone:
  """A random 2-layer, H=32 BERT with a hashing tokenizer: no assets needed (tests, CI)."""
  config = bert.tiny_config()
  ids = jnp.zeros((1, max_len), jnp.int32)
  variables = bert.BertEncoder(config).init(jax.random.key(seed), ids, ids)
  return bert_backbone(
    f"tiny_bert(seed={seed})",
    config,
    variables,
    lambda texts: hash_tokenize(texts, config.vocab_size, max_len),
    frozen_layers=frozen_layers,
  )
