"""The hooks behind ``share_jax.profiling``: a context variable holding the active recording,
the ``phase`` decorator and ``call_kernel``, which the merge pipeline calls."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax

_ACTIVE: contextvars.ContextVar[Recording | None] = contextvars.ContextVar(
  "share_jax_profiling", default=None
)


@dataclasses.dataclass(frozen=True)
class KernelCall:
  """One call of a jitted kernel: ``fn(*args, **kwargs)``."""

  fn: Callable
  args: tuple
  kwargs: dict

  def run(self) -> Any:
    """Call the kernel again and wait for its outputs."""
    return jax.block_until_ready(self.fn(*self.args, **self.kwargs))

  def lower(self) -> jax.stages.Lowered:
    """The call lowered (``.compile()`` it for compile time, ``.as_text()`` for HLO)."""
    return self.fn.lower(*self.args, **self.kwargs)


@dataclasses.dataclass
class Recording:
  """What ran inside one ``record()`` block: seconds summed per phase, kernel calls in order."""

  seconds: dict[str, float] = dataclasses.field(default_factory=dict)
  kernels: list[KernelCall] = dataclasses.field(default_factory=list)

  def replay(self) -> list[Any]:
    """Run every recorded kernel call again, in order; their outputs."""
    return [call.run() for call in self.kernels]


@contextlib.contextmanager
def record() -> Iterator[Recording]:
  """Record the phases and kernel calls of every merge-pipeline call made inside the block."""
  rec = Recording()
  token = _ACTIVE.set(rec)
  try:
    yield rec
  finally:
    _ACTIVE.reset(token)


def phase(name: str) -> Callable[[Callable], Callable]:
  """Decorator: inside ``record``, add the call's wall time, outputs waited
  for, to ``seconds[name]``. Phases must not nest."""

  def wrap(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def timed(*args, **kwargs):
      rec = _ACTIVE.get()
      if rec is None:
        return fn(*args, **kwargs)
      start = time.perf_counter()
      out = jax.block_until_ready(fn(*args, **kwargs))
      rec.seconds[name] = rec.seconds.get(name, 0.0) + time.perf_counter() - start
      return out

    return timed

  return wrap


def call_kernel(fn: Callable, *args, **kwargs) -> Any:
  """``fn(*args, **kwargs)`` for a jitted ``fn``; inside ``record`` the call
  is also appended to ``kernels``."""
  rec = _ACTIVE.get()
  if rec is not None:
    rec.kernels.append(KernelCall(fn, args, kwargs))
  return fn(*args, **kwargs)
