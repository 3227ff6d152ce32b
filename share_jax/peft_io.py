"""PEFT LoRA adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``) to and
from LoRA trees at Flax kernel paths.

PEFT stores, per torch module ``m``, ``base_model.model.<m>.lora_A.weight`` (r, in) and
``lora_B.weight`` (out, r) with ΔW_torch = B A · lora_alpha / r (/ √r with ``use_rslora``). The
Flax kernel (in, out) gets ΔW = a b with a = Aᵀ, b = Bᵀ · scale. A Conv2d LoRA (lora_A (r, c_in,
kh, kw), lora_B (c_out, r, 1, 1)) adapts the Flax kernel (kh, kw, c_in, c_out) as the matrix
(kh·kw·c_in, c_out); with ``fan_in_fan_out`` (GPT-2's Conv1D) the Flax kernel is stored (out, in)
(HF FlaxGPT2) and the LoRA is ``transposed``. Module names become Flax paths
through a named ``Scheme``; ``modules_to_save`` tensors become heads in Flax layout (Linear
``weight`` (out, in) → ``kernel`` (in, out), 1-D ``weight`` → ``scale``, ``bias``).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import shutil
import tempfile
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors.flax
import safetensors.numpy

from share_jax import _patterns
from share_jax.apply import reconstruct
from share_jax.errors import ShareError
from share_jax.lora import LoRA, lora_leaves
from share_jax.paths import flatten_with_paths, nest
from share_jax.subspace import Subspace

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# Config keys whose truthy value changes what the weights mean: never imported silently.
UNSUPPORTED = (
  "use_dora",
  "lora_bias",
  "use_qalora",
  "use_bdlora",
  "layer_replication",
  "target_parameters",
  "trainable_token_indices",
  "alora_invocation_tokens",
  "megatron_config",
  "velora_config",
  "monteclora_config",
  "arrow_config",
  "kasa_config",
)
# Initialisations that rewrite the base weights, so the adapter is relative to another model.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<side>[AB])(?:\.\w+)?\.weight")
_HEAD_KEY = re.compile(r"(?P<module>.+)\.(?P<param>weight|bias)")


# ----------------------------------------------------------------------------- module names


_PLACEHOLDERS = {
  "prefix": r"(?:\w+SEP)*",  # e.g. "bert." / "roberta." / "vit." before the encoder
  "path": r"\w+(?:SEP\w+)*",
  "i": r"\d+",
  "qkv": r"query|key|value",
}


def _compile(template: str, sep: str) -> re.Pattern:
  parts = re.split(r"\{(\w+)\}", template)
  regex = "".join(
    re.escape(p) if j % 2 == 0 else f"(?P<{p}>{_PLACEHOLDERS[p].replace('SEP', re.escape(sep))})"
    for j, p in enumerate(parts)
  )
  return re.compile(regex)


def _fill(template: str, values: Mapping[str, str], sep: str) -> str:
  other = "/" if sep == "." else "."
  return template.format(**{k: v.replace(other, sep) for k, v in values.items()})


@dataclasses.dataclass(frozen=True)
class Scheme:
  """PEFT module name ↔ Flax kernel path, as rules ``(torch template, Flax template)``.

  ``{i}``, ``{qkv}``, ``{path}`` and ``{prefix}`` match ``_PLACEHOLDERS``; "." in a torch name
  is "/" in a Flax path. The Flax side names the module; its kernel is ``<module>/kernel``.
  """

  name: str
  rules: tuple[tuple[str, str], ...]

  def to_flax(self, module: str) -> str:
    """``encoder.layer.3.attention.self.query`` → e.g. ``layer_3/attention/query/kernel``."""
    for torch_t, flax_t in self.rules:
      m = _compile(torch_t, ".").fullmatch(module)
      if m:
        return _fill(flax_t, m.groupdict(), "/") + "/kernel"
    raise ShareError(f"PEFT module {module!r} has no Flax path in scheme {self.name!r}")

  def to_peft(self, path: str, prefix: str = "") -> str:
    """The inverse of ``to_flax``; ``prefix`` (e.g. ``bert.``) goes before ``{prefix}``."""
    module, _, leaf = path.rpartition("/")
    prefix = prefix if not prefix or prefix.endswith(".") else prefix + "."
    for torch_t, flax_t in self.rules:
      m = _compile(flax_t, "/").fullmatch(module)
      if m and leaf == "kernel":
        return _fill(torch_t, {"prefix": prefix, **m.groupdict()}, ".")
    raise ShareError(f"Flax kernel {path!r} has no PEFT module name in scheme {self.name!r}")


_BERT_MLP = (
  ("{prefix}encoder.layer.{i}.attention.output.dense", "layer_{i}/attention/output"),
  ("{prefix}encoder.layer.{i}.intermediate.dense", "layer_{i}/intermediate"),
  ("{prefix}encoder.layer.{i}.output.dense", "layer_{i}/output"),
)
SCHEMES = {
  # HF Flax models (FlaxBert/Roberta/ViT/Llama/Mistral…) name params like the torch modules.
  "hf_flax": Scheme("hf_flax", (("{path}", "{path}"),)),
  # share_jax.experiments.models.bert from HF BERT/RoBERTa torch names.
  "share_bert": Scheme(
    "share_bert",
    (("{prefix}encoder.layer.{i}.attention.self.{qkv}", "layer_{i}/attention/{qkv}"), *_BERT_MLP),
  ),
  # share_jax.experiments.models.vit from HF ViT torch names.
  "share_vit": Scheme(
    "share_vit",
    (
      ("{prefix}encoder.layer.{i}.attention.attention.{qkv}", "layer_{i}/attention/{qkv}"),
      *_BERT_MLP,
    ),
  ),
}


def get_scheme(scheme: str | Scheme) -> Scheme:
  if isinstance(scheme, Scheme):
    return scheme
  if scheme not in SCHEMES:
    raise ShareError(f"unknown module-name scheme {scheme!r}; known: {sorted(SCHEMES)}")
  return SCHEMES[scheme]


# ----------------------------------------------------------------------------- config


def _pattern_value(config: Mapping[str, Any], name: str, module: str, default: Any) -> Any:
  """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key matching the end of
  ``module`` (``re.match(rf"(.*\\.)?({key})$", module)``, with bounded work), else ``default``."""
  for key, value in (config.get(name) or {}).items():
    if _patterns.suffix_match(key, module, name):
      return value
  return default


def _module_scale(config: Mapping[str, Any], module: str, rank: int) -> float:
  """ΔW = B A · this, for one module of rank ``rank``."""
  alpha = _pattern_value(config, "alpha_pattern", module, config["lora_alpha"])
  return float(alpha) / (float(np.sqrt(rank)) if config.get("use_rslora") else rank)


def _check_config(config: Mapping[str, Any], where: Any) -> None:
  """An error for anything but a plain LoRA without bias."""
  if config.get("peft_type") != "LORA":
    raise ShareError(f"{where}: peft_type {config.get('peft_type')!r} is not supported (LORA only)")
  if config.get("bias", "none") != "none":
    raise ShareError(f"{where}: bias={config['bias']!r} is not supported (only 'none')")
  used = [k for k in UNSUPPORTED if config.get(k)]
  if used:
    raise ShareError(f"{where}: unsupported LoRA variant options {used}")
  init = str(config.get("init_lora_weights", "")).lower()
  if init.startswith(BASE_CHANGING_INITS):
    raise ShareError(
      f"{where}: init_lora_weights={config['init_lora_weights']!r} changed the base weights; "
      "convert the adapter with PEFT's path_initial_model_for_weight_conversion first"
    )
  for key in ("r", "lora_alpha"):
    if not _positive(config.get(key)):
      raise ShareError(f"{where}: {key} must be a positive number, got {config.get(key)!r}")
  for name in ("rank_pattern", "alpha_pattern"):
    patterns = config.get(name) or {}
    if not isinstance(patterns, dict):
      raise ShareError(f"{where}: {name} must be an object, got {patterns!r}")
    for key, value in patterns.items():
      _patterns.checked(key, f"{where}: {name}")
      if not _positive(value):
        raise ShareError(f"{where}: {name}[{key!r}] must be a positive number, got {value!r}")
  for name in ("target_modules", "exclude_modules"):
    if isinstance(config.get(name), str):
      _patterns.checked(config[name], f"{where}: {name}")


def _positive(x: Any) -> bool:
  return isinstance(x, int | float) and not isinstance(x, bool) and 0 < x < float("inf")


def _saved_by(module: str, modules_to_save: list[str] | None) -> bool:
  """Whether ``module`` lies in one of PEFT's ``modules_to_save`` (a dotted name segment)."""
  return any(f".{m}." in f".{module}." for m in modules_to_save or ())


def _targets(module: str, target_modules: list[str] | str | None) -> bool:
  """PEFT's ``target_modules``/``exclude_modules`` match: a regex string (full match) or name
  suffixes."""
  if isinstance(target_modules, str):
    return _patterns.fullmatch(target_modules, module, "target_modules")
  return any(module == t or module.endswith(f".{t}") for t in target_modules or ())


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class AdapterMeta:
  """A task's PEFT provenance, as stored in checkpoint ``task_meta`` under ``"peft"``: what
  ``export_task`` needs to write it back (scheme, Flax path → module name, adapter_config)."""

  scheme: str
  config: Mapping[str, Any]
  modules: Mapping[str, str]

  def to_json(self) -> dict:
    return {
      "peft": {"scheme": self.scheme, "config": dict(self.config), "modules": dict(self.modules)}
    }

  @classmethod
  def parse(cls, task_meta: Any, where: str = "task metadata") -> AdapterMeta | None:
    """The record in one task's metadata, ``None`` when it has no ``"peft"`` entry."""
    if not isinstance(task_meta, Mapping) or task_meta.get("peft") is None:
      return None
    peft = task_meta["peft"]
    ok = (
      isinstance(peft, Mapping)
      and sorted(peft) == ["config", "modules", "scheme"]
      and isinstance(peft["scheme"], str)
      and isinstance(peft["config"], Mapping)
      and isinstance(peft["modules"], Mapping)
      and all(isinstance(k, str) and isinstance(v, str) for k, v in peft["modules"].items())
    )
    if not ok:
      raise ShareError(f"{where}: 'peft' is not {{scheme, config, modules}}: {peft!r:.200}")
    return cls(peft["scheme"], dict(peft["config"]), dict(peft["modules"]))


@dataclasses.dataclass(frozen=True)
class PeftAdapter:
  """A PEFT LoRA adapter in Flax terms.

  ``lora``: LoRA tree at Flax kernel paths, a (in, r), b (r, out) with the scale folded in;
  ``heads``: ``modules_to_save`` params in Flax layout; ``config``: the adapter_config.json;
  ``modules``: ``{Flax kernel path: PEFT module name}``; ``scheme``: the scheme's name;
  ``shapes``: ``{Flax kernel path: the kernel shape the factors imply}``.
  """

  lora: dict
  heads: dict
  config: dict
  modules: dict[str, str]
  scheme: str
  shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

  @property
  def meta(self) -> AdapterMeta:
    return AdapterMeta(self.scheme, self.config, self.modules)

  def task_meta(self) -> dict:
    """JSON for ``Checkpointer.save(task_meta=…)``: what ``export_task`` needs to write it back."""
    return self.meta.to_json()


def _head_param(module: str, param: str, w: np.ndarray) -> tuple[str, np.ndarray]:
  if param == "bias":
    return f"{module.replace('.', '/')}/bias", w
  if w.ndim == 2:
    return f"{module.replace('.', '/')}/kernel", w.T
  if w.ndim == 1:
    return f"{module.replace('.', '/')}/scale", w
  raise ShareError(f"modules_to_save tensor {module}.{param} has shape {w.shape}")


def read_adapter(
  directory: str | Path, *, scheme: str | Scheme = "hf_flax", params: Any = None
) -> PeftAdapter:
  """Read a PEFT LoRA adapter directory; every tensor is used or an error says why.

  Args:
    scheme: how module names map to Flax paths (``"hf_flax"``, ``"share_bert"``, …).
    params: the base model's params (arrays or ``ShapeDtypeStruct``); if given, every adapted
      kernel must exist there with shape (in, out).
  """
  directory = Path(directory)
  scheme = get_scheme(scheme)
  for name in (CONFIG_FILE, WEIGHTS_FILE):
    if not (directory / name).is_file():
      raise ShareError(f"{directory}: no {name} (a PEFT LoRA adapter directory needs both files)")
  try:
    config = json.loads((directory / CONFIG_FILE).read_text())
    tensors = safetensors.flax.load_file(directory / WEIGHTS_FILE)
  except Exception as e:  # JSON, I/O and safetensors' own error types
    raise ShareError(f"{directory}: cannot read the adapter ({e})") from None
  odd = {k: str(v.dtype) for k, v in tensors.items() if not jnp.issubdtype(v.dtype, jnp.floating)}
  if odd:
    raise ShareError(f"{directory}: tensors of a non-floating-point dtype: {odd}")
  tensors = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
  if not isinstance(config, dict):
    raise ShareError(f"{directory / CONFIG_FILE}: not a JSON object")
  _check_config(config, directory)
  factors: dict[str, dict[str, np.ndarray]] = {}
  head_params, unexpected, keys = {}, [], {}
  for key, w in tensors.items():
    name = key.removeprefix(PREFIX)
    lora_key, head_key = _LORA_KEY.fullmatch(name), _HEAD_KEY.fullmatch(name)
    if lora_key:
      slot = (lora_key["module"], lora_key["side"])
    elif head_key and _saved_by(head_key["module"], config.get("modules_to_save")):
      slot = (head_key["module"], head_key["param"])
    else:
      unexpected.append(key)
      continue
    if slot in keys:
      raise ShareError(
        f"{directory}: tensors {keys[slot]!r} and {key!r} are the same factor of module "
        f"{slot[0]!r} (one adapter per directory, keys with or without {PREFIX!r})"
      )
    keys[slot] = key
    if lora_key:
      factors.setdefault(lora_key["module"], {})[lora_key["side"]] = w
    else:
      path, x = _head_param(head_key["module"], head_key["param"], w)
      head_params[path] = x
  if unexpected:
    raise ShareError(
      f"{directory}: tensors that are neither LoRA factors nor modules_to_save: "
      f"{sorted(unexpected)[:6]}"
    )
  if not factors:
    raise ShareError(f"{directory}: the adapter has no LoRA factors")
  kernels = flatten_with_paths(params) if params is not None else None
  leaves, modules, shapes = {}, {}, {}
  unknown = []
  for module, sides in sorted(factors.items()):
    try:
      path = scheme.to_flax(module)
    except ShareError:
      unknown.append(module)
      continue
    leaves[path], shapes[path] = _lora(directory, config, module, sides, path, kernels)
    if path in modules:
      raise ShareError(f"{directory}: modules {modules[path]!r} and {module!r} map to {path!r}")
    modules[path] = module
  if unknown:
    raise ShareError(
      f"{directory}: PEFT modules with no Flax path in scheme {scheme.name!r}: {unknown[:6]}"
    )
  return PeftAdapter(nest(leaves), nest(head_params), config, modules, scheme.name, shapes)


def _conv_factors(directory, module, a, b) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
  """Conv2d LoRA: lora_A (r, c_in, kh, kw), lora_B (c_out, r, 1, 1) -> A (r, kh·kw·c_in) and
  B (c_out, r) in the Flax kernel's row order, and that kernel's shape (kh, kw, c_in, c_out)."""
  if b.ndim != 4 or b.shape[2:] != (1, 1) or a.shape[0] != b.shape[1]:
    raise ShareError(
      f"{directory}: module {module!r}: Conv lora_A {a.shape} and lora_B {b.shape} are not "
      "(r, c_in, kh, kw), (c_out, r, 1, 1)"
    )
  r, c_in, kh, kw = a.shape
  return a.transpose(0, 2, 3, 1).reshape(r, -1), b[:, :, 0, 0], (kh, kw, c_in, b.shape[0])


def _lora(directory, config, module, sides, path, kernels) -> tuple[LoRA, tuple[int, ...]]:
  """The module's LoRA in Flax terms and the shape of the Flax kernel it adapts."""
  if set(sides) != {"A", "B"}:
    raise ShareError(f"{directory}: module {module!r} has lora_{''.join(sides)} only")
  a, b = sides["A"], sides["B"]
  flip = bool(config.get("fan_in_fan_out")) and a.ndim == 2
  if a.ndim == 4:
    a, b, shape = _conv_factors(directory, module, a, b)
  elif a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
    raise ShareError(
      f"{directory}: module {module!r}: lora_A {a.shape} and lora_B {b.shape} are not (r, in), "
      "(out, r)"
    )
  else:
    shape = (b.shape[0], a.shape[1]) if flip else (a.shape[1], b.shape[0])
  rank = _pattern_value(config, "rank_pattern", module, config["r"])
  if a.shape[0] != rank:
    raise ShareError(
      f"{directory}: module {module!r} has rank {a.shape[0]} but adapter_config.json says {rank}"
    )
  if kernels is not None:
    if path not in kernels:
      raise ShareError(f"{directory}: module {module!r} maps to {path!r}, not in the base params")
    if tuple(np.shape(kernels[path])) != shape:
      raise ShareError(
        f"{directory}: module {module!r} maps {a.shape[1]} -> {b.shape[0]} but the base kernel "
        f"{path!r} is {tuple(np.shape(kernels[path]))} (the factors imply {shape})"
      )
  lora = LoRA(a.T, b.T * np.float32(_module_scale(config, module, rank)), transposed=flip)
  return lora, shape


# ----------------------------------------------------------------------------- writing


def _default_config(modules: list[str], r: int) -> dict:
  """A plain LoRA config adapting exactly ``modules`` at rank ``r`` with scale 1."""
  return {
    "peft_type": "LORA",
    "task_type": None,
    "base_model_name_or_path": None,
    "target_modules": sorted(modules),
    "r": r,
    "lora_alpha": r,
    "lora_dropout": 0.0,
    "bias": "none",
    "use_rslora": False,
    "fan_in_fan_out": False,
    "init_lora_weights": True,
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "inference_mode": True,
  }


def write_adapter(
  directory: str | Path,
  lora_tree: Any,
  *,
  scheme: str | Scheme = "hf_flax",
  config: Mapping[str, Any] | None = None,
  modules: Mapping[str, str] | None = None,
  heads: Any = None,
  prefix: str = "",
  kernel_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> dict:
  """Write a LoRA tree (and heads in Flax layout) as a PEFT adapter directory; returns the config.

  ``kernel_shapes`` gives the Flax shape of convolution kernels (kh, kw, c_in, c_out), whose
  LoRA (a (kh·kw·c_in, r)) is written as PEFT's Conv2d LoRA; ``transposed`` LoRAs (all or none)
  set ``fan_in_fan_out``.

  ``config`` (e.g. the imported adapter_config.json) is kept except for ``r``, ``rank_pattern``
  and ``modules_to_save``; ``lora_alpha``, ``alpha_pattern``, ``use_rslora`` and
  ``target_modules`` are preserved and B is stored divided by the module's scale. ``modules``
  names the PEFT module of a path, else ``scheme.to_peft(path, prefix)``. The directory must not
  exist or be empty; it appears complete or not at all.
  """
  directory = Path(directory)
  if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
    raise ShareError(f"{directory} already exists and is not an empty directory")
  scheme = get_scheme(scheme)
  leaves = lora_leaves(lora_tree)
  if not leaves:
    raise ShareError("the LoRA tree adapts no kernel")
  names = {p: (modules or {}).get(p) or scheme.to_peft(p, prefix) for p in leaves}
  ranks = {p: lora.rank for p, lora in leaves.items()}
  counts = collections.Counter(ranks.values()).most_common()
  r = max(n for n, c in counts if c == counts[0][1])
  out = dict(config) if config is not None else _default_config(list(names.values()), r)
  out["r"] = r
  out["rank_pattern"] = {re.escape(names[p]): k for p, k in ranks.items() if k != r}
  flipped = {lora.transposed for lora in leaves.values()}
  if len(flipped) > 1:
    raise ShareError("PEFT's fan_in_fan_out is one flag: the LoRAs are not all transposed or not")
  out["fan_in_fan_out"] = flipped == {True}
  _check_config(out, "export")
  missed = [
    m
    for m in names.values()
    if not _targets(m, out.get("target_modules")) or _targets(m, out.get("exclude_modules"))
  ]
  if missed:
    raise ShareError(
      f"target_modules {out.get('target_modules')!r} (exclude_modules "
      f"{out.get('exclude_modules')!r}) would leave modules {missed[:6]} unadapted"
    )
  tensors = {}
  for p, lora in leaves.items():
    m = names[p]
    b = np.asarray(lora.b, np.float32) * np.float32(lora.scale / _module_scale(out, m, ranks[p]))
    a = np.asarray(lora.a, np.float32).T
    shape = (kernel_shapes or {}).get(p)
    if shape is not None and len(shape) == 4:  # Conv2d: (r, c_in, kh, kw) and (c_out, r, 1, 1)
      kh, kw, c_in, _ = shape
      a, b = a.reshape(-1, kh, kw, c_in).transpose(0, 3, 1, 2), b[:, :, None, None]
    tensors[f"{PREFIX}{m}.lora_A.weight"] = a
    tensors[f"{PREFIX}{m}.lora_B.weight"] = np.swapaxes(b, 0, 1)
  head_modules = set()
  for path, x in flatten_with_paths(heads or {}).items():
    module, _, leaf = path.rpartition("/")
    param = {"kernel": "weight", "scale": "weight", "bias": "bias"}.get(leaf)
    if param is None or not module:
      raise ShareError(f"head leaf {path!r} is not <module>/(kernel|bias|scale)")
    module = module.replace("/", ".")
    head_modules.add(module)
    x = np.asarray(x, np.float32)
    tensors[f"{PREFIX}{module}.{param}"] = x.T if leaf == "kernel" else x
  kept = out.get("modules_to_save") or []
  out["modules_to_save"] = (
    (kept + sorted(m for m in head_modules if not _saved_by(m, kept))) if head_modules else None
  )
  _write_dir(directory, out, {k: np.ascontiguousarray(v) for k, v in tensors.items()})
  return out


def _write_dir(directory: Path, config: dict, tensors: dict[str, np.ndarray]) -> None:
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
  try:
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    safetensors.numpy.save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    if directory.exists():
      directory.rmdir()
    tmp.rename(directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


# ----------------------------------------------------------------------------- tasks


def effective_rank(lora: LoRA, rtol: float = 1e-5) -> LoRA:
  """The same ΔW (scale folded in) with rank = its numerical rank: singular values above
  ``rtol`` · σ_max (at least 1), split evenly between a (in, r) and b (r, out)."""
  a = np.asarray(lora.a, np.float64)
  b = np.asarray(lora.b, np.float64) * lora.scale
  qa, ra = np.linalg.qr(a)
  qb, rb = np.linalg.qr(b.T)
  u, s, vt = np.linalg.svd(ra @ rb.T)
  r = max(1, int(np.sum(s > rtol * s[0]))) if s[0] > 0 else 1
  root = np.sqrt(s[:r])
  return LoRA(
    (qa @ (u[:, :r] * root)).astype(np.float32),
    ((root[:, None] * vt[:r]) @ qb.T).astype(np.float32),
    transposed=lora.transposed,
  )


def export_task(
  subspace: Subspace,
  task_id: Hashable,
  directory: str | Path,
  *,
  meta: AdapterMeta | Mapping[str, Any] | None = None,
  scheme: str | Scheme | None = None,
  prefix: str = "",
  head_module: str | None = None,
  rtol: float = 1e-5,
) -> dict:
  """Write task ``task_id`` as a PEFT adapter at its effective rank; returns the config.

  Args:
    meta: the task's ``AdapterMeta`` (or its checkpoint metadata, ``PeftAdapter.task_meta()``):
      scheme, module names and the original adapter_config.json, which are then preserved.
    scheme, prefix: module naming for tasks without PEFT metadata (default ``hf_flax``).
    head_module: the PEFT module name of a head stored as bare params (``{"kernel", "bias"}``).
  """
  peft = meta if isinstance(meta, AdapterMeta) else AdapterMeta.parse(meta, f"task {task_id!r}")
  leaves = lora_leaves(reconstruct(subspace, task_id))
  lora = nest({p: effective_rank(x, rtol) for p, x in leaves.items()})
  heads = subspace.heads.get(task_id)
  if heads and head_module:
    heads = nest(
      {f"{head_module.replace('.', '/')}/{p}": x for p, x in flatten_with_paths(heads).items()}
    )
  return write_adapter(
    directory,
    lora,
    scheme=scheme or (peft.scheme if peft else "hf_flax"),
    config=peft.config if peft else None,
    modules=peft.modules if peft else None,
    heads=heads,
    prefix=prefix,
    kernel_shapes={s.path: s.stored_shape for s in subspace.layout.kernels},
  )
