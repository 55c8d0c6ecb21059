"""One run per workdir: an flock'ed lock file that names its holder (pid and host).

The kernel drops an flock when its process dies (SIGKILL and OOM included), so a lock file whose lock is
free but which still names a holder is stale: the next run takes it over with a warning. The file is
never deleted (deleting a locked file lets a third process lock a new inode of the same name).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket

from absl import logging

from cnn_caption.errors import UserError

LOCK_NAME = '.lock'


def _describe(holder: dict) -> str:
  return f'pid {holder.get("pid", "?")} on host {holder.get("host", "?")}'


class WorkdirLock:
  """Exclusive lock on a workdir; use as a context manager or acquire()/release()."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    self._fd: int | None = None

  def _read_holder(self, fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode('utf-8', 'replace').strip()
    if not text:
      return {}
    try:
      holder = json.loads(text)
    except json.JSONDecodeError:
      return {'pid': '?', 'host': '?', 'raw': text[:80]}
    return holder if isinstance(holder, dict) else {}

  def acquire(self) -> None:
    """Takes the lock or raises UserError naming the live holder; a stale holder is logged and replaced."""
    if self._fd is not None:
      return
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
      raise UserError(
        f'cannot create the lock file {self.path} ({e.strerror}); check that --workdir is a writable folder'
      ) from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = self._read_holder(fd)
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise UserError(
          f'workdir {self.workdir} is in use by another run ({_describe(holder)}); wait for '
          'it to finish or stop it, or use another --workdir'
        ) from None
      raise UserError(f'cannot lock {self.path} ({e.strerror}); use a workdir on a local file system') from None
    holder = self._read_holder(fd)
    if holder:
      logging.warning(
        'workdir %s: taking over the stale lock of %s (that process is gone)', self.workdir, _describe(holder)
      )
    me = json.dumps({'pid': os.getpid(), 'host': socket.gethostname()})
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, me.encode() + b'\n')
    os.fsync(fd)
    self._fd = fd

  def release(self) -> None:
    """Clears the holder and drops the lock (the file stays, empty)."""
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)
    except OSError:
      pass  # a full or read-only disk must not hide the run's own error
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def read_holder(workdir: str) -> dict:
  """The holder recorded in workdir's lock file ({} when none); for messages and tests."""
  path = os.path.join(workdir, LOCK_NAME)
  try:
    with open(path) as f:
      text = f.read().strip()
    return json.loads(text) if text else {}
  except (OSError, json.JSONDecodeError):
    return {}
