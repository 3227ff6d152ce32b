"""``benchmarks/RESULTS.md``: each benchmark owns one ``## `` section of it."""

import re
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def write_section(heading: str, text: str) -> None:
  """Replace the section that starts with ``heading`` (or append it); other sections stay."""
  old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
  pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.M | re.S)
  new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip() + "\n\n" + text
  RESULTS.write_text(new)
