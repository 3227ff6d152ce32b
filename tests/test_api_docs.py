"""The README's API table documents every name ``share_jax`` exports and every public module."""

import re
from pathlib import Path

import share_jax as sj

README = Path(__file__).parent.parent / "README.md"
PUBLIC_MODULES = (
  "checkpoint",
  "peft_io",
  "sharding",
  "serving",
  "profiling",
  "diagnostics",
  "cli",
  "experiments",
)


def api_rows() -> set[str]:
  """The first cell of every row of the README's ``## API`` table."""
  section = README.read_text().split("\n## API\n", 1)[1].split("\n## ", 1)[0]
  return set(re.findall(r"^\| `([^`]+)` \|", section, re.M))


def test_every_export_and_public_module_has_a_row():
  rows = api_rows()
  missing = [n for n in sj.__all__ if f"sj.{n}" not in rows]
  missing += [m for m in PUBLIC_MODULES if f"share_jax.{m}" not in rows]
  assert not missing, f"add to the README's API table: {missing}"


def test_the_table_names_nothing_that_is_not_exported():
  stale = [r for r in api_rows() if r.startswith("sj.") and r.removeprefix("sj.") not in sj.__all__]
  assert not stale, f"the README's API table names {stale}, which share_jax does not export"
  assert len(sj.__all__) == len(set(sj.__all__))
  assert all(hasattr(sj, n) for n in sj.__all__)
