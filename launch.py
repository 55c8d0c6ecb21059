"""Entry point: flags only, then the command line module.

python launch.py --config=configs/classifier.py --workdir=runs/fmnist
python launch.py --config=configs/q1_cnn.py --mode=summary
python launch.py --config=configs/captioner.py --mode=baselines --workdir=runs/baselines   # no-decoder baselines
python launch.py --mode=report --workdir=runs/fmnist  # (re)writes runs/fmnist/report.html
python launch.py --mode=compare --workdir=runs/att --compare_to=runs/plain  # runs/att/compare_plain.html
python launch.py ... --coordinator_address=localhost:12345 --num_processes=2 --process_id=0   # and =1
python launch.py ... --distributed_auto        # SLURM, TPU pods: jax.distributed finds the processes
python launch.py ... --jax_platforms=cpu       # any --jax_* option
"""

_ENDED = []  # not empty once the run has returned or raised: a signal then meets the process exiting


def _when_stopped_outside_the_run() -> str:
  return 'while exiting; the run had ended' if _ENDED else 'while starting; nothing written; restart the same command'


if __name__ == '__main__':  # before absl and jax are imported (seconds): a stop then is one line, not a traceback
  from cnn_caption import stop_signals

  stop_signals.install(_when_stopped_outside_the_run, resumable=True)

from absl import app  # noqa: E402 (after the signal handlers: importing jax takes seconds)
from absl import flags  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cnn_caption import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path.py or path.py:variant).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, plots, results.')
_MODE = flags.DEFINE_enum('mode', 'train', list(cli.MODES), 'What to do with the config.')
_IMAGES = flags.DEFINE_list('images', [], 'Image paths for --mode=imagenet_predict / caption.')
_COMPARE_TO = flags.DEFINE_string('compare_to', None, '--mode=compare: the captioning workdir set beside --workdir.')
# Several processes (jax.distributed): these three, or the same from the environment, or --distributed_auto.
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address', None, f'host:port of process 0, the same for every process (default: ${cli.ENV_COORDINATOR}).'
)
_NUM_PROCESSES = flags.DEFINE_integer(
  'num_processes', None, f'Processes in the run (default: ${cli.ENV_NUM_PROCESSES}, else 1).'
)
_PROCESS_ID = flags.DEFINE_integer(
  'process_id', None, f'This process, in [0, num_processes) (default: ${cli.ENV_PROCESS_ID}).'
)
_DISTRIBUTED_AUTO = flags.DEFINE_bool(
  'distributed_auto',
  False,
  'Let jax.distributed.initialize() detect the cluster (SLURM, TPU pods, ...) instead of the three flags above.',
)
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer('distributed_timeout', 300, 'Seconds to wait for every process.')
_CACHE_DIR = flags.DEFINE_string(
  'compilation_cache_dir',
  None,
  'Folder keeping compiled programs between runs (default: $JAX_COMPILATION_CACHE_DIR, else '
  '$XDG_CACHE_HOME/cnn_caption/jax or ~/.cache/cnn_caption/jax); "" turns the cache off.',
)
_CACHE = flags.DEFINE_bool('compilation_cache', True, 'Keep compiled programs between runs (--nocompilation_cache).')


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    cli.main(
      _MODE.value,
      _CONFIG.value,
      _WORKDIR.value,
      _IMAGES.value,
      cli.Distributed(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _DISTRIBUTED_AUTO.value, _DISTRIBUTED_TIMEOUT.value
      ),
      _CACHE_DIR.value if _CACHE.value else '',
      _COMPARE_TO.value,
    )
  finally:
    _ENDED.append(True)


if __name__ == '__main__':
  jax.config.config_with_absl()  # every --jax_* option as a flag, e.g. --jax_platforms=cpu
  cli.run_app(main)
