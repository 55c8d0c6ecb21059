"""Classifier training throughput next to the PyTorch peer, one pinned core, interleaved. Prints JSON lines.

  python bench/bench_classifier.py --peer_python=/work/peer-venv/bin/python      # batch 8 and 64, 3 reps
  python bench/bench_classifier.py --batch_sizes=64 --reps=5 --no_compile
  python bench/bench_classifier.py --sweep                                         # + the homework sweep (2 cores)

The project side is the trainer's own call: `jax.jit(train.train_steps, donate_argnums=0)` with the
classification task's loss, config.steps_per_call steps per call, on random data of Fashion-MNIST's shape
(the batches are prepared before timing, as the trainer's host prefetch does): the default program
(`project`, with the config's XLA options) and the original one (`project_exact`: configs/classifier.py:original),
interleaved. Each record ends with `targets`: the ceiling share, the ratio to the original program and to
the best peer, each with its target and whether it is met. The peer is
/work/shared/peers/torch_cnn.py (eager, --channels-last and, unless --no_compile, --compile), each
repetition a fresh pinned process whose warm-up is not timed. The ratio is to the fastest peer setup.
"""

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

ROOT = common.ROOT


def forward_flops_per_sample() -> float:
  """Multiply-adds x 2 of one forward pass of the homework CNN (conv16-pool-conv32-pool-600-120-10)."""
  conv1 = 28 * 28 * 16 * 9 * 1
  conv2 = 12 * 12 * 32 * 9 * 16
  dense = 1152 * 600 + 600 * 120 + 120 * 10
  return 2.0 * (conv1 + conv2 + dense)


def make_project(
  batch_size: int, steps_per_call: int, seconds: float, half_precision: bool = False, exact=False, xla_options=None
):
  """Returns a function that trains for about `seconds` and returns samples/s (compiled on creation).

  exact: the original program (configs/classifier.py:original: fast_layers=False, the gradient norm logged, no
  XLA options), bit for bit. xla_options: 'name=value,...' for the train step instead of the config's own
  config.xla_options.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  sys.path.insert(0, ROOT)
  from cnn_caption import config_utils
  from cnn_caption import models
  from cnn_caption import train
  from cnn_caption.tasks import classification
  from cnn_caption.training import optim

  sys.path.insert(0, os.path.join(ROOT, 'configs'))
  import classifier

  config = classifier.get_config('original' if exact else None)
  if xla_options is not None and not exact:
    config.xla_options = xla_options
  # The task's loss and metrics are static: no data needed.
  cls = classification.ClassificationTask
  task = types.SimpleNamespace(loss=cls.loss, metrics=cls.metrics if config.log_grad_norm else cls.loss_metrics)
  overrides = {'dtype': jnp.bfloat16} if half_precision else {}
  model = models.create_model(config, **overrides)
  tx = optim.make_optimizer(config.optimizer, 1000)
  state = train.create_train_state(model, models.example_inputs(config), jax.random.key(0), tx)
  options = config_utils.compiler_options(config)  # as the trainer compiles its step
  step = functools.partial(train.train_steps, task=task, num_steps=steps_per_call)
  fn = jax.jit(step, donate_argnums=0, compiler_options=options)
  rng = np.random.default_rng(0)
  batches = [
    {
      'image': rng.random((steps_per_call, batch_size, 28, 28, 1), np.float32),
      'label': rng.integers(0, 10, (steps_per_call, batch_size)).astype(np.int32),
    }
    for _ in range(4)
  ]
  key = jax.random.key(1)
  holder = {'state': state}
  holder['state'], m = fn(holder['state'], batches[0], key)
  jax.block_until_ready(m)

  def run() -> float:
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
      holder['state'], m = fn(holder['state'], batches[calls % 4], key)
      calls += 1
    jax.block_until_ready(m)
    return calls * steps_per_call * batch_size / (time.perf_counter() - t0)

  return run


# The targets of the homework step: a share of the one-thread sgemm ceiling per batch size, and ratios to
# the original program and to the best PyTorch setup, all measured in the same run.
CEILING_SHARE_TARGET = {8: 0.35, 64: 0.50}
EXACT_RATIO_TARGET = 2.0
PEER_RATIO_TARGET = 1.5


def targets(record: dict, batch_size: int) -> dict:
  """Each target: the measured value, the target and whether it is met (None when not measured)."""
  out = {}
  share = record.get('project_peak_fraction')
  if batch_size in CEILING_SHARE_TARGET:
    goal = CEILING_SHARE_TARGET[batch_size]
    out['ceiling_share'] = {'value': share, 'target': goal, 'met': None if share is None else share >= goal}
  ratio = record.get('ratio_to_exact')
  out['ratio_to_exact'] = {'value': ratio, 'target': EXACT_RATIO_TARGET, 'met': ratio >= EXACT_RATIO_TARGET}
  peer = record.get('ratio_to_best_peer')
  out['ratio_to_best_peer'] = {
    'value': peer,
    'target': PEER_RATIO_TARGET,
    'met': None if peer is None else peer >= PEER_RATIO_TARGET,
  }
  return out


def make_peer(args, batch_size: int, setup: str, steps: int):
  flags = ['--batch-size', str(batch_size), '--threads', '1', '--steps', str(steps)]
  flags += {'eager': [], 'channels_last': ['--channels-last'], 'compile': ['--compile', '--channels-last']}[setup]
  return lambda: common.run_peer(args, 'torch_cnn.py', flags)[0]['samples_per_s']


def sweep(extra: list[str], workdir: str | None = None) -> dict:
  """Wall time and peak memory (process tree) of the homework sweep on all cores."""
  workdir = workdir or tempfile.mkdtemp(prefix='bench_sweep_')
  cmd = [
    sys.executable,
    os.path.join(ROOT, 'launch.py'),
    '--config=' + os.path.join(ROOT, 'configs/classifier.py:sweep'),
    f'--workdir={workdir}',
    *extra,
  ]
  out = {'bench': 'classifier_sweep', **common.finish_job(common.start_job(cmd))}
  out.update(workdir=workdir, cores=sorted(os.sched_getaffinity(0)))
  if out['rc'] == 0:
    with open(os.path.join(workdir, 'results.json')) as f:
      r = json.load(f)
    out['runs'] = [{k: run[k] for k in ('learning_rate', 'val_accuracy', 'test_accuracy')} for run in r['runs']]
    out['best_lr'] = r['best']['learning_rate']
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  common.add_common_flags(parser)
  parser.add_argument('--batch_sizes', default='8,64')
  parser.add_argument('--steps_per_call', type=int, default=8, help="the classifier config's default")
  parser.add_argument('--seconds', type=float, default=4.0, help='project seconds per repetition')
  parser.add_argument('--peer_steps', type=int, default=300, help='peer timed steps per repetition')
  parser.add_argument('--no_compile', action='store_true', help='skip the torch.compile peer (20 s compile each)')
  parser.add_argument('--half_precision', action='store_true', help='also time bfloat16 compute (reported apart)')
  parser.add_argument('--xla_options', default=None, help="the project's train step with these instead of the config's")
  parser.add_argument('--sweep', action='store_true', help='also time the full sweep on all cores')
  parser.add_argument('--sweep_args', default='', help='extra launch.py flags for the sweep, space separated')
  parser.add_argument('--sweep_workdir', default=None, help='where the sweep writes (default: a temp dir)')
  args = parser.parse_args()
  cores = os.sched_getaffinity(0)
  common.pin(args.core)
  common.emit(common.header(args, 'classifier_train'))
  peak = common.cpu_peak(args)
  flops = 3 * forward_flops_per_sample()  # forward + two backward products
  for batch_size in (int(b) for b in args.batch_sizes.split(',')):
    sides = {
      'project': make_project(batch_size, args.steps_per_call, args.seconds, xla_options=args.xla_options),
      'project_exact': make_project(batch_size, args.steps_per_call, args.seconds, exact=True),
    }
    if args.half_precision:
      sides['project_bf16'] = make_project(batch_size, args.steps_per_call, args.seconds, half_precision=True)
    if args.peer_python:
      setups = ['eager', 'channels_last'] + ([] if args.no_compile else ['compile'])
      for setup in setups:
        sides[setup] = make_peer(args, batch_size, setup, args.peer_steps)
    results = common.interleave(args.reps, sides)
    peers = {k: v for k, v in results.items() if not k.startswith('project')}  # project_exact is ours too
    extra = {
      'batch_size': batch_size,
      'steps_per_call': args.steps_per_call,
      'project_exact': common.spread(results['project_exact']),
      'ratio_to_exact': round(statistics.median(results['project']) / statistics.median(results['project_exact']), 2),
      'xla_options': args.xla_options,  # None: the config's own config.xla_options
    }
    if args.half_precision:
      extra['project_bf16'] = common.spread(results['project_bf16'])
    record = common.compare(
      'classifier_train', f'train_b{batch_size}', 'samples/s', results['project'], peers, flops, peak, **extra
    )
    record['targets'] = targets(record, batch_size)
    common.emit(record)
    if args.profile:
      trace_dir = os.path.join(args.profile, f'classifier_train_b{batch_size}')
      common.emit(
        {
          'bench': 'classifier_train',
          'path': f'train_b{batch_size}',
          'profile': common.profiled(trace_dir, sides['project']),
        }
      )
  os.sched_setaffinity(0, cores)
  if args.sweep:
    common.emit(sweep(args.sweep_args.split(), args.sweep_workdir))


if __name__ == '__main__':
  main()
