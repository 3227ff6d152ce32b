"""A tfds builder over one local source, and a loader that returns numpy columns."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from share_jax.experiments.data.sources import default_data_dir, require

PathLike = str | os.PathLike


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Reads a local file or folder (``source``) once and stores it as array_record.

  ``source=None`` means the installed asset (``default_source``). Examples keep the source's
  order. ``data_dir`` (default ``default_data_dir()``) caches one prepared copy per dataset name
  and version, so point two different sources at two different ``data_dir``s.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  # No checksums file: nothing is downloaded. (tfds 4.9.10's ``code_path`` also needs
  # ``importlib_resources``, which current etils no longer installs.)
  code_path = None

  def __init__(self, source: PathLike | None = None, *, data_dir: PathLike | None = None):
    self._source = Path(source) if source is not None else None
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    super().__init__(data_dir=os.fspath(data_dir), file_format="array_record")

  def default_source(self) -> Path | None:
    """Where the installed asset is, or None when it is not installed."""
    raise NotImplementedError

  @property
  def source(self) -> Path:
    """The source; FileNotFoundError (with the install command) if it does not exist."""
    return require(self._source or self.default_source(), self.name)

  def _split_generators(self, dl_manager):
    """One ``train`` split read from ``source`` (override for more)."""
    del dl_manager
    return {"train": self._generate_examples(self.source)}

  def _info_for(self, features: dict, description: str) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=description,
      features=tfds.features.FeaturesDict(features),
      disable_shuffling=True,
    )


def load(builder: LocalBuilder) -> dict[str, dict[str, np.ndarray | list[str]]]:
  """``{split: {feature: column}}`` of the whole dataset, prepared first if needed.

  Text columns are lists of str, the other columns numpy arrays.
  """
  builder.download_and_prepare()  # a no-op once prepared
  return {split: _columns(ds) for split, ds in builder.as_data_source().items()}


def _columns(ds) -> dict:
  rows = ds.__getitems__(list(range(len(ds))))
  out = {}
  for key in rows[0]:
    values = [row[key] for row in rows]
    if isinstance(values[0], bytes):
      out[key] = [v.decode("utf-8") for v in values]
    else:
      out[key] = np.stack(values)
  return out
