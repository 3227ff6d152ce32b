"""Regular expressions read from files (PEFT ``rank_pattern``, ``target_modules``, …), matched
with bounded work: a pattern that could backtrack catastrophically is refused up front.

Refused: a repetition whose body holds another repetition or an alternation (``(a+)+``,
``(a|a)+b``), back-references, more than ``MAX_UNBOUNDED`` unbounded repetitions, and names
longer than ``MAX_NAME``. What is left matches a name of n characters in O(n^MAX_UNBOUNDED) steps.
"""

from __future__ import annotations

import functools
import re
from re import _constants as C  # noqa: N812
from re import _parser

from share_jax.errors import ShareError

MAX_UNBOUNDED = 3
MAX_NAME = 512
_REPEATS = (C.MAX_REPEAT, C.MIN_REPEAT, C.POSSESSIVE_REPEAT)


def _children(op, av) -> list:
  if op in _REPEATS:
    return [av[2]]
  if op == C.SUBPATTERN:
    return [av[3]]
  if op == C.BRANCH:
    return list(av[1])
  if op in (C.ASSERT, C.ASSERT_NOT):
    return [av[1]]
  if op == C.ATOMIC_GROUP:
    return [av]
  if op == C.GROUPREF_EXISTS:
    return [p for p in av[1:] if p is not None]
  return []


def _walk(items, inside_repeat: bool) -> int:
  """Unbounded repetitions in ``items``; ``ValueError`` for a risky construct."""
  unbounded = 0
  for op, av in items:
    if op in (C.GROUPREF, C.GROUPREF_EXISTS):
      raise ValueError("back-references are not supported")
    if inside_repeat and (op in _REPEATS or op == C.BRANCH):
      raise ValueError("a repetition of a repetition or an alternation can backtrack for ever")
    repeated = op in _REPEATS and av[1] > 1
    unbounded += op in _REPEATS and av[1] == C.MAXREPEAT
    for child in _children(op, av):
      unbounded += _walk(child, inside_repeat or repeated)
  return unbounded


@functools.cache
def compile_bounded(pattern: str) -> re.Pattern:
  """``pattern`` compiled; a ``ValueError`` saying why when it is invalid or risky."""
  if not isinstance(pattern, str):
    raise ValueError(f"{pattern!r} is not a string")
  try:
    compiled = re.compile(pattern)
    unbounded = _walk(_parser.parse(pattern), False)
  except re.error as e:
    raise ValueError(f"invalid regular expression ({e})") from None
  if unbounded > MAX_UNBOUNDED:
    raise ValueError(f"more than {MAX_UNBOUNDED} unbounded repetitions")
  return compiled


def checked(pattern: str, what: str) -> re.Pattern:
  """``compile_bounded`` with a ``ShareError`` naming ``what`` (e.g. the config key)."""
  try:
    return compile_bounded(pattern)
  except ValueError as e:
    raise ShareError(f"{what}: pattern {pattern!r}: {e}") from None


def fullmatch(pattern: str, name: str, what: str) -> bool:
  if len(name) > MAX_NAME:
    raise ShareError(f"{what}: module name of {len(name)} characters (at most {MAX_NAME})")
  return checked(pattern, what).fullmatch(name) is not None


def suffix_match(pattern: str, name: str, what: str) -> bool:
  """PEFT's ``re.match(rf"(.*\\.)?({pattern})$", name)``: the pattern matches the whole name or
  a suffix after a dot."""
  parts = name.split(".")
  return any(fullmatch(pattern, ".".join(parts[i:]), what) for i in range(len(parts)))
