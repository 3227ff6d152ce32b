"""Typed errors. Every message names the offending key path, task id or argument."""


class ShareError(ValueError):
  """Bad input to a share_jax operation; nothing was modified."""


class UnknownTaskError(ShareError, KeyError):
  """A task id that the subspace does not hold."""

  def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
    return str(self.args[0]) if self.args else ""


class CheckpointError(ShareError):
  """A checkpoint that is missing, corrupted, locked, of an unknown format or of another base
  model, or a version that could not be written."""
