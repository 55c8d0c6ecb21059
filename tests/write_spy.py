"""Runs launch.py and records every file it writes from Python (test helper for "only process 0 writes").

  python tests/write_spy.py LOG_FILE launch.py ARGS...

Each path opened for writing, created through os.open, or renamed into place is appended to LOG_FILE.
Array data that orbax writes from C++ (tensorstore) is not seen, which is what the tests want: every
process must write its own shards of a checkpoint.
"""

import builtins
import os
import runpy
import sys


def main() -> None:
  log_path, script, *args = sys.argv[1:]
  log = open(log_path, 'a', buffering=1)
  real_open, real_os_open, real_replace, real_rename = builtins.open, os.open, os.replace, os.rename

  def record(path) -> None:
    if isinstance(path, (str, bytes, os.PathLike)):
      log.write(os.path.abspath(os.fsdecode(path)) + '\n')

  def spy_open(file, mode='r', *a, **k):
    if any(c in mode for c in 'wax+'):
      record(file)
    return real_open(file, mode, *a, **k)

  def spy_os_open(path, flags, *a, **k):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
      record(path)
    return real_os_open(path, flags, *a, **k)

  def spy_replace(src, dst, *a, **k):
    record(dst)
    return real_replace(src, dst, *a, **k)

  def spy_rename(src, dst, *a, **k):
    record(dst)
    return real_rename(src, dst, *a, **k)

  builtins.open, os.open, os.replace, os.rename = spy_open, spy_os_open, spy_replace, spy_rename
  sys.argv = [script, *args]
  sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
  runpy.run_path(script, run_name='__main__')


if __name__ == '__main__':
  main()
