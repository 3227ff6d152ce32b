"""A backbone from any local Hugging Face checkpoint folder, through ``transformers``' Flax classes.

``model_dir`` holds ``config.json``, weights (``flax_model.msgpack``, or PyTorch
``model.safetensors`` / ``pytorch_model.bin``, converted on load) and a tokenizer
(``tokenizer.json``, or the slow files: ``vocab.txt``, ``vocab.json`` + ``merges.txt``, a
SentencePiece model). Nothing is fetched from the hub. Any ``FlaxAutoModel`` architecture works
(BERT, RoBERTa, ELECTRA, Llama, Mistral, …): the features are the last hidden states, mean-pooled
over the attention mask (or the first token, ``pooling="cls"``).

Params keep the HF Flax names (``encoder/layer/3/attention/self/query/kernel``,
``layers/0/self_attn/q_proj/kernel``), the names the ``hf_flax`` PEFT scheme uses. With
``frozen_layers=F`` (BERT-style encoders: ``encoder.layer.layers``), the embeddings and the first
F layers run once per task in ``encode`` and ``params`` keeps only the layers after them.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from share_jax.errors import ShareError
from share_jax.experiments.backbones import Backbone, Inputs, batched

# q/v projections of BERT-style encoders, ViT and Llama-style decoders.
HF_QUERY_VALUE = (
  r"(attention/self/(query|value)|attention/attention/(query|value)|self_attn/(q_proj|v_proj))"
  r"/kernel$"
)
WEIGHTS = (
  "flax_model.msgpack",
  "flax_model.msgpack.index.json",
  "model.safetensors",
  "model.safetensors.index.json",
  "pytorch_model.bin",
  "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = (
  ("tokenizer.json",),
  ("vocab.txt",),
  ("vocab.json", "merges.txt"),
  ("tokenizer.model",),
  ("spiece.model",),
  ("sentencepiece.bpe.model",),
)
_ENCODE_BATCH = 64
# ``hf_backbone`` options a config's backbone section may carry over to a ``model_dir`` model.
OPTIONS = ("max_len", "frozen_layers", "pooling", "target")


def check_model_dir(model_dir: str | Path | None) -> Path:
  """``model_dir`` as a Path; a ShareError naming what is missing (folder, config, weights,
  tokenizer files)."""
  if not model_dir:
    raise ShareError(
      "no model_dir: pass --config.model_dir=/path/to/checkpoint (a local HF folder with "
      "config.json, weights and tokenizer files)"
    )
  path = Path(model_dir).expanduser()
  if not path.is_dir():
    raise ShareError(f"model_dir {path} does not exist (a local HF checkpoint folder is needed)")
  missing = []
  if not (path / "config.json").is_file():
    missing.append("config.json")
  if not any((path / w).is_file() for w in WEIGHTS):
    missing.append(f"weights (one of {', '.join(WEIGHTS)})")
  if not any(all((path / f).is_file() for f in files) for files in TOKENIZER_FILES):
    missing.append("tokenizer files (tokenizer.json, vocab.txt, vocab.json + merges.txt, …)")
  if missing:
    raise ShareError(f"model_dir {path} lacks {'; '.join(missing)}")
  return path


def load_hf(model_dir: str | Path | None):
  """(Flax model, tokenizer) from a local folder; PyTorch-only weights are converted."""
  path = check_model_dir(model_dir)
  from transformers import AutoTokenizer, FlaxAutoModel

  from_pt = not any((path / w).is_file() for w in WEIGHTS[:2])
  try:
    model = FlaxAutoModel.from_pretrained(path, from_pt=from_pt, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
  except (OSError, ValueError, KeyError) as e:
    raise ShareError(f"model_dir {path}: transformers cannot load it ({e})") from None
  if tokenizer.pad_token is None:  # decoder tokenizers (Llama, Mistral) have none
    tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
  return model, tokenizer


def tokenize(tokenizer, texts: Sequence, max_len: int, names: Sequence[str]) -> Inputs:
  """Texts, or (first, second) pairs, to int32 arrays (N, max_len) named as in ``names``."""
  texts = list(texts)
  pairs = bool(texts) and isinstance(texts[0], tuple | list)
  args = ([t[0] for t in texts], [t[1] for t in texts]) if pairs else (texts,)
  enc = tokenizer(
    *args, padding="max_length", truncation=True, max_length=max_len, return_tensors="np"
  )
  return {k: np.asarray(enc[k], np.int32) for k in names if k in enc}


def pool(hidden: jax.Array, mask: jax.Array, pooling: str) -> jax.Array:
  """(B, T, H) hidden states, (B, T) mask -> (B, H): masked mean, or the first token."""
  if pooling == "cls":
    return hidden[:, 0]
  m = mask[..., None].astype(hidden.dtype)
  return (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


def hf_backbone(
  model_dir: str | Path | None,
  max_len: int = 128,
  frozen_layers: int = 0,
  pooling: str = "mean",
  target: str = HF_QUERY_VALUE,
) -> Backbone:
  """A frozen HF Flax model from ``model_dir`` (see the module docstring)."""
  if pooling not in ("mean", "cls"):
    raise ShareError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
  model, tokenizer = load_hf(model_dir)
  accepted = inspect.signature(model.__call__).parameters
  names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted]
  if "token_type_ids" in names and getattr(model.config, "type_vocab_size", 2) < 2:
    names.remove("token_type_ids")  # RoBERTa: one segment type

  def run(params, inputs, **kwargs):
    return model(**{n: inputs[n] for n in names if n in inputs}, params=params, **kwargs)

  name = f"hf:{Path(model_dir).name}({model.config.model_type}, max_len={max_len})"
  dim = model.config.hidden_size
  if frozen_layers == 0:

    def encode(texts) -> Inputs:
      return tokenize(tokenizer, texts, max_len, names)

    def features(params, inputs: Inputs) -> jax.Array:
      hidden = run(params, inputs).last_hidden_state
      return pool(hidden, inputs["attention_mask"], pooling)

    return Backbone(name, model.params, dim, encode, features, target)
  return _split_backbone(
    model, tokenizer, names, run, name, max_len, frozen_layers, pooling, target
  )


def _split_backbone(model, tokenizer, names, run, name, max_len, frozen, pooling, target):
  """A BERT-style encoder whose first ``frozen`` layers run once, in ``encode``."""
  layers = model.params.get("encoder", {}).get("layer")
  n = model.config.num_hidden_layers
  if not isinstance(layers, dict) or sorted(layers) != sorted(map(str, range(n))):
    raise ShareError(
      f"frozen_layers needs a BERT-style encoder (params encoder/layer/0..); "
      f"{model.config.model_type} has top-level params {sorted(model.params)}"
    )
  if not 0 <= frozen < n:
    raise ShareError(f"frozen_layers={frozen} must be in [0, {n})")
  top = {"encoder": {"layer": {str(i): layers[str(i)] for i in range(frozen, n)}}}
  prefix = jax.jit(
    lambda inputs: run(model.params, inputs, output_hidden_states=True).hidden_states[frozen]
  )

  def encode(texts) -> Inputs:
    tokens = tokenize(tokenizer, texts, max_len, names)
    hidden = batched(prefix, tokens, _ENCODE_BATCH)
    return {"hidden": hidden, "attention_mask": tokens["attention_mask"]}

  def features(params, inputs: Inputs) -> jax.Array:
    encoder = model.module.bind({"params": params}).encoder
    hidden, mask = inputs["hidden"], inputs["attention_mask"]
    for i in range(frozen, n):
      hidden = encoder.layer.layers[i](hidden, mask, layer_head_mask=None, deterministic=True)[0]
    return pool(hidden, mask, pooling)

  return Backbone(
    f"{name}, frozen_layers={frozen}", top, model.config.hidden_size, encode, features, target
  )
