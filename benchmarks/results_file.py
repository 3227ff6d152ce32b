"""``benchmarks/RESULTS.md``: each benchmark owns one ``## `` section of it."""

import datetime
import os
import platform
import re
import sys
from pathlib import Path

import jax
import numpy as np

RESULTS = Path(__file__).with_name("RESULTS.md")


def mean_std(values, spec: str = ".1f") -> str:
  """``mean ± sd`` (population sd) of the values that are not None, or ``-`` if none are."""
  values = [v for v in values if v is not None]
  if not values:
    return "-"
  return f"{np.mean(values):{spec}} ± {np.std(values):{spec}}"


def write_section(heading: str, text: str) -> None:
  """Replace the section that starts with ``heading`` (or append it); other sections stay."""
  old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
  pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.M | re.S)
  new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip() + "\n\n" + text
  RESULTS.write_text(new)


def report(heading: str, module: str, body: list[str], *, write: bool, note: str = "") -> str:
  """Print a section: ``heading``, a line with the command (``python -m module`` and this
  process's arguments), date, machine, device, jax and load (then ``note``), and ``body``;
  with ``write``, also put it into RESULTS.md. Returns the text."""
  device = jax.devices()[0]
  run = (
    f"`{' '.join(['python -m', module, *sys.argv[1:]])}` — {datetime.date.today()}, "
    f"{platform.machine()} {os.cpu_count()}-core {device.platform.upper()} "
    f"({device.device_kind}), jax {jax.__version__}, load average {os.getloadavg()[0]:.1f}{note}."
  )
  text = "\n".join([heading, "", run, "", *body, ""])
  print(text)
  if write:
    write_section(heading, text)
  return text
