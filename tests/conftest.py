"""Shared test helpers: paths, data availability, running launch.py in a subprocess."""

import atexit
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

# One XLA compilation cache for the whole session, this process and every launch.py it starts (they inherit
# the environment): most of the suite's time is XLA compiling the same smoke programs again in each test.
# Set before jax is imported, which reads these at import. A cached executable is the compiled program itself,
# so results are unchanged; only compilations over 0.5 s are written.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _XLA_CACHE = tempfile.mkdtemp(prefix='cnn_caption_tests_xla_cache_')
  atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _XLA_CACHE
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

from absl import logging as absl_logging  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402 (after the cache settings above)

from cnn_caption.training import checkpoint  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST_DIR = '/usr/share/datasets/fashion-mnist'
UCM_DIR = os.environ.get('CNN_CAPTION_UCM_DIR', os.path.join(ROOT, '..', 'shared', 'data', 'ucm_captions'))


@pytest.fixture(autouse=True)
def _absl_verbosity_restored():
  """Each test ends with absl's verbosity as it found it.

  cli.main drops it to WARNING in a process other than 0: an in-process test of that must not silence the INFO
  lines that later tests read (caplog).
  """
  logger = absl_logging.get_absl_logger()
  level = logger.level  # not get_verbosity(): before flags are parsed it says WARNING while the level is unset
  yield
  logger.setLevel(level)


def jit_init(module, *args, **kwargs):
  """module.init(*args, **kwargs) jitted as the trainer compiles it (train.INIT_COMPILER_OPTIONS).

  The same values as the default compilation in a fraction of its time: a 4-channel CNN's initialiser took
  9 s to compile at LLVM's default level, 1 s at level 1.
  """
  from cnn_caption import train

  return jax.jit(functools.partial(module.init, **kwargs), compiler_options=train.INIT_COMPILER_OPTIONS)(*args)


def train_step_hlo(config, workdir: str, mesh=None) -> str:
  """The compiled HLO of the trainer's own one-step program for a classifier config (a batch of 8 zeros).

  With a mesh, the state is replicated and the batch split over it, as a run places them.
  """
  import types

  import numpy as np

  from cnn_caption import models
  from cnn_caption import train
  from cnn_caption.tasks import classification
  from cnn_caption.training import optim
  from cnn_caption.training import parallel

  cls = classification.ClassificationTask
  task = types.SimpleNamespace(num_train=160, loss=cls.loss, metrics=cls.loss_metrics)
  trainer = train.Trainer(config, workdir, task, mesh)
  tx = optim.make_optimizer(config.optimizer, 100)
  state = train.create_train_state(models.create_model(config), models.example_inputs(config), jax.random.key(0), tx)
  batch = {'image': np.zeros((1, 8, 28, 28, 1), np.float32), 'label': np.zeros((1, 8), np.int32)}
  if mesh is not None:
    state, batch = parallel.replicate(state, mesh), parallel.shard_local_batch(batch, mesh, 8, 1)
  return trainer._compile(1).lower(state, batch, jax.random.key(1)).compile().as_text()


def has_fashion_mnist() -> bool:
  return os.path.exists(os.path.join(FMNIST_DIR, 'train-images-idx3-ubyte.gz'))


needs_fmnist = pytest.mark.skipif(
  not has_fashion_mnist(), reason=f'Fashion-MNIST not in {FMNIST_DIR} (apt-get install dataset-fashion-mnist)'
)


def run_launch(*args: str, devices: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
  """Runs launch.py in a fresh interpreter (optionally with N fake CPU devices)."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}' if devices > 1 else ''
  env['JAX_PLATFORMS'] = 'cpu'
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, 'launch.py'), *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def run_module(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  """`python -m module args` in a fresh interpreter on the CPU, from the repository root."""
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  return subprocess.run(
    [sys.executable, '-m', module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
  )


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f]


def strip_timing(records: list[dict]) -> list[dict]:
  return [{k: v for k, v in r.items() if 'seconds' not in k} for r in records]


def override(config, **fields):
  """Sets dotted config fields, e.g. **{'optimizer.learning_rate': 0.1}."""
  for key, value in fields.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def final_params(workdir: str):
  """(step, params) of the newest checkpoint in workdir/checkpoints."""
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), 3)
  step = ckpt.latest_step()
  params = ckpt.restore_params(step)
  ckpt.close()
  return step, params


def kill_after_checkpoint(args: list[str], workdir: str, min_step: int, timeout: float = 240) -> list[int]:
  """Starts launch.py, SIGKILLs it once a checkpoint at step >= min_step exists; returns the saved steps."""
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  proc = subprocess.Popen(
    [sys.executable, 'launch.py', *args, f'--workdir={workdir}'],
    cwd=ROOT,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
    if steps and max(steps) >= min_step:
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  assert steps, 'no checkpoint was written before the kill'
  return steps


def strong_smoke(overrides: dict):
  """configs/classifier.py:strong shrunk for tests: 96 training images, 2 epochs, channels (4, 8)."""
  from configs import classifier

  fields = {
    'data.num_train': 96,
    'data.num_eval': 64,
    'eval_batch_size': 64,
    'batch_size': 32,
    'num_epochs': 2,
    'model.channels': (4, 8),
    'model.hidden': 8,
    'optimizer.schedule': 'constant',
    'log_every_steps': 3,
    'steps_per_call': 2,
  }
  return override(classifier.get_config('strong'), **{**fields, **overrides})


# The longest files first, each file's tests in their written order: `pytest -n 2 --dist loadfile` (the README's
# command) hands whole files to the workers in this order, so the long ones do not start last.
_LONG_FILES_FIRST = ('test_multiprocess.py', 'test_train.py', 'test_captioning.py')


def pytest_configure(config):
  # pytest-xdist (3.x) would hand out the files by their number of tests, most first: a file of few long
  # tests (test_multiprocess.py) then starts halfway and the other worker idles at the end. Keep the order below.
  if hasattr(config.option, 'loadscopereorder'):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  def rank(item):
    name = os.path.basename(str(item.path))
    return _LONG_FILES_FIRST.index(name) if name in _LONG_FILES_FIRST else len(_LONG_FILES_FIRST)

  items.sort(key=rank)  # stable: the order within a file, and among the other files, is kept
