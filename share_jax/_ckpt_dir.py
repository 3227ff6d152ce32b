"""The files of a checkpoint directory: which entries are versions, the writer lock, the trash.

A version is a directory named by its number (``3``, never ``003``) that Orbax committed (it holds
``_CHECKPOINT_METADATA`` and ``meta/metadata``); any other numbered entry is *stray* (a partial
copy, a hand-made folder): never listed, never overwritten, never counted. Writers hold an
exclusive ``flock`` on ``.lock`` (its text names the holder); deleted versions are renamed into
``.trash`` first, so a killed process never leaves half a version listed.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path

from share_jax.errors import CheckpointError

LOCK = ".lock"
TRASH = ".trash"
_TMP = re.compile(r".*\.orbax-checkpoint-tmp.*")
_NUMBERED = re.compile(r"\d+")


@dataclasses.dataclass(frozen=True)
class Listing:
  """``versions``: complete versions, oldest first; ``strays``: other numbered entries;
  ``top``: the largest number any entry uses (0 for none), so a new version never collides."""

  versions: tuple[int, ...]
  strays: tuple[str, ...]
  top: int


def check_directory(directory: Path) -> None:
  if directory.exists() and not directory.is_dir():
    raise CheckpointError(f"{directory} is a file, not a checkpoint directory")


def is_complete(entry: Path) -> bool:
  return (entry / "_CHECKPOINT_METADATA").is_file() and (entry / "meta" / "metadata").is_file()


def scan(directory: Path) -> Listing:
  """The versions and stray entries of ``directory`` (empty for a missing one)."""
  check_directory(directory)
  if not directory.exists():
    return Listing((), (), 0)
  versions, strays, top = [], [], 0
  for entry in directory.iterdir():
    if not _NUMBERED.fullmatch(entry.name):
      continue
    top = max(top, int(entry.name))
    if str(int(entry.name)) == entry.name and entry.is_dir() and is_complete(entry):
      versions.append(int(entry.name))
    else:
      strays.append(entry.name)
  return Listing(tuple(sorted(versions)), tuple(sorted(strays)), top)


def discard(directory: Path, versions: list[int]) -> None:
  """Delete versions: each first renamed into the trash (atomic), then the trash emptied."""
  trash = directory / TRASH
  trash.mkdir(exist_ok=True)
  for v in versions:
    (directory / str(v)).rename(trash / f"{v}.{uuid.uuid4().hex}")
  shutil.rmtree(trash, ignore_errors=True)


def clean(directory: Path) -> None:
  """Remove what killed writers left: Orbax's temporary directories and the trash. Only a
  writer holding the lock may call this (another writer's temporary directory is live)."""
  for entry in directory.iterdir():
    if entry.name == TRASH or _TMP.fullmatch(entry.name):
      shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()


class WriterLock:
  """An exclusive ``flock`` on ``directory/.lock`` (created with the directory).

  A second writer, in this process or another, polls until ``timeout`` seconds have passed and
  then gets a ``CheckpointError`` naming the holder (pid, host, since when).
  """

  def __init__(self, directory: Path, timeout: float):
    self.directory, self.timeout = directory, timeout
    self._fd: int | None = None

  def __enter__(self) -> WriterLock:
    check_directory(self.directory)
    try:
      self.directory.mkdir(parents=True, exist_ok=True)
      fd = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise CheckpointError(f"cannot take the writer lock of {self.directory}: {e}") from None
    deadline = time.monotonic() + self.timeout
    while True:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if time.monotonic() >= deadline:
          holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown"
          os.close(fd)
          raise CheckpointError(
            f"{self.directory} is being written by another writer ({holder}); "
            f"gave up after waiting {self.timeout:g} s"
          ) from None
        time.sleep(0.02)
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} since {now}\n".encode(), 0)
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
