"""One line, not a traceback, when a stop signal ends a program outside a training run's own handling.

launch.py installs this before it imports anything heavy; a training run then handles stops itself
(parallel.StopRequest: a checkpoint, then `preempted at step N`) and puts this back when it returns. The side
tools (`python -m cnn_caption.inference`, `python -m cnn_caption.captioning.compare`) keep it for their whole
life: they have nothing to save, so a stop ends them at once. Without it, Ctrl-C during an import printed a
KeyboardInterrupt traceback that the import could swallow (the program then went on), and SIGTERM ended the
process without a word. Imports only os, signal and sys: it must be cheap to import before jax.
"""

from collections.abc import Callable
import os
import signal
import sys

SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def words(signum: int, resumable: bool) -> tuple[str, int]:
  """(what happened, exit code) for a stop signal.

  SIGINT is `interrupted`, exit 130. SIGTERM / SIGHUP are `preempted`, exit 0, for a program that resumes
  from where it stopped (a training run: a scheduler's preemption is not a failure); otherwise `stopped`,
  exit 128 + the signal's number, as a shell reports a killed command.
  """
  if signum == signal.SIGINT:
    return 'interrupted', 130
  return ('preempted', 0) if resumable else ('stopped', 128 + signum)


def install(when: Callable[[], str], *, resumable: bool = False) -> None:
  """From now on SIGTERM, SIGHUP and SIGINT end the process at once with the line `WORD (SIGNAME) when()`.

  `when()` says what the stop met (e.g. 'while starting; nothing written; restart the same command'). The exit
  code and WORD are words(signum, resumable). A signal already ignored (nohup, a shell's background job) stays
  ignored. The process ends with os._exit: an exception raised from a handler could land inside code that
  swallows it.
  """

  def stop(signum, frame) -> None:
    del frame
    word, code = words(signum, resumable)
    print(f'{word} ({signal.Signals(signum).name}) {when()}', file=sys.stderr, flush=True)
    os._exit(code)  # pylint: disable=protected-access

  for signum in SIGNALS:
    if signal.getsignal(signum) is not signal.SIG_IGN:
      signal.signal(signum, stop)
