"""The one exception type for bad input, and one-line wording for the OS errors a user's setup causes."""

from __future__ import annotations

import errno

# errno -> the fix; an OSError with one of these comes from the machine or the paths given, not from a bug.
_ENVIRONMENT_ERRNOS = {
  errno.ENOSPC: 'free some disk space or use a --workdir on another disk',
  errno.EDQUOT: 'free some space within your quota or use a --workdir elsewhere',
  errno.EROFS: 'the file system is read-only; use a --workdir on a writable disk',
  errno.EACCES: 'check the permissions, or use a --workdir you can write to',
  errno.EPERM: 'check the permissions, or use a --workdir you can write to',
  errno.ENOTDIR: 'a part of the path is a file, not a folder; fix the path',
  errno.EISDIR: 'a folder is where a file was expected; fix the path',
  errno.ENAMETOOLONG: 'use a shorter path',
  errno.EMFILE: 'too many open files; raise `ulimit -n`',
  errno.ENOMEM: 'out of memory; lower the batch size or free memory',
}


class UserError(Exception):
  """Bad input (config, data, paths): the message names the culprit and the fix."""


def environment_error_message(e: OSError) -> str | None:
  """One line for an OSError the environment caused (full disk, read-only, permissions); None for others."""
  fix = _ENVIRONMENT_ERRNOS.get(e.errno)
  if fix is None:
    return None
  where = f' {e.filename}' if e.filename else ''
  return f'{e.strerror or errno.errorcode.get(e.errno, e.errno)}:{where}; {fix}'
