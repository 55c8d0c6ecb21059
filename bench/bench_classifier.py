"""Classifier throughput and sweep cost. Prints JSON lines.

  python bench/bench_classifier.py            # samples/s at batch 8 and 64, pinned to core 0
  python bench/bench_classifier.py --sweep    # also the full homework sweep: wall time, peak memory

Throughput uses the real training path (Trainer's jitted `train_steps`, unrolled steps_per_call) on
random data of Fashion-MNIST's shape. Compare with the PyTorch 2.13 eager figures in ECOSYSTEM.md
(about 1,300 samples/s at batch 8 and 2,800 at batch 64 on one core).
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def throughput(batch_size: int, steps_per_call: int, seconds: float = 8.0) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, ROOT)
  from cnn_caption import models, optim, train
  from cnn_caption.tasks import classification as tasks  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(ROOT, 'configs'))
  import classifier  # pylint: disable=g-import-not-at-top
  config = classifier.get_config()
  model = models.create_model(config)
  tx = optim.make_optimizer(config.optimizer, 1000)
  state = train.create_train_state(model, models.example_inputs(config), jax.random.key(0), tx)
  task = tasks.ClassificationTask  # loss and metrics are static: the class serves without loading data
  fn = jax.jit(functools.partial(train.train_steps, task=task, num_steps=steps_per_call), donate_argnums=0)
  rng = np.random.default_rng(0)
  batches = [{'image': rng.random((steps_per_call, batch_size, 28, 28, 1), np.float32),
              'label': rng.integers(0, 10, (steps_per_call, batch_size)).astype(np.int32)} for _ in range(4)]
  key = jax.random.key(1)
  t0 = time.perf_counter()
  state, m = fn(state, batches[0], key)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  calls, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    state, m = fn(state, batches[calls % 4], key)
    calls += 1
  jax.block_until_ready(m)
  dt = time.perf_counter() - t0
  return {'bench': 'classifier_train', 'batch_size': batch_size, 'steps_per_call': steps_per_call,
          'samples_per_s': round(calls * steps_per_call * batch_size / dt, 1), 'compile_s': round(compile_s, 2),
          'cores': sorted(os.sched_getaffinity(0))}


def _tree_rss_mb(pid: int) -> float:
  """Resident memory of a process and all its descendants, from /proc."""
  total, stack = 0, [pid]
  while stack:
    p = stack.pop()
    try:
      with open(f'/proc/{p}/status') as f:
        for line in f:
          if line.startswith('VmRSS:'):
            total += int(line.split()[1])
      with open(f'/proc/{p}/task/{p}/children') as f:
        stack.extend(int(c) for c in f.read().split())
    except (FileNotFoundError, ProcessLookupError):
      pass
  return total / 1024


def sweep(extra: list[str], workdir: str | None = None) -> dict:
  workdir = workdir or tempfile.mkdtemp(prefix='bench_sweep_')
  cmd = [sys.executable, os.path.join(ROOT, 'launch.py'), '--config=' + os.path.join(ROOT, 'configs/classifier.py:sweep'),
         f'--workdir={workdir}', *extra]
  t0 = time.time()
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  peak = [0.0]

  def sample():
    while proc.poll() is None:
      peak[0] = max(peak[0], _tree_rss_mb(proc.pid))
      time.sleep(0.5)

  threading.Thread(target=sample, daemon=True).start()
  rc = proc.wait()
  wall = time.time() - t0
  out = {'bench': 'classifier_sweep', 'rc': rc, 'wall_s': round(wall, 1), 'peak_rss_mb': round(peak[0], 1),
         'workdir': workdir, 'cores': sorted(os.sched_getaffinity(0))}
  if rc == 0:
    with open(os.path.join(workdir, 'results.json')) as f:
      r = json.load(f)
    out['runs'] = [{k: run[k] for k in ('learning_rate', 'val_accuracy', 'test_accuracy')} for run in r['runs']]
    out['best_lr'] = r['best']['learning_rate']
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--sweep', action='store_true', help='also time the full sweep on all cores')
  parser.add_argument('--sweep_args', default='', help='extra launch.py flags for the sweep, space separated')
  parser.add_argument('--sweep_workdir', default=None, help='where the sweep writes (default: a temp dir)')
  parser.add_argument('--core', type=int, default=0)
  parser.add_argument('--seconds', type=float, default=8.0)
  args = parser.parse_args()
  cores = os.sched_getaffinity(0)
  os.sched_setaffinity(0, {args.core})  # one core for the throughput figures, as `taskset -c 0`
  for batch_size, k in ((8, 1), (8, 8), (64, 1)):
    print(json.dumps(throughput(batch_size, k, args.seconds)), flush=True)
  os.sched_setaffinity(0, cores)
  if args.sweep:
    print(json.dumps(sweep(args.sweep_args.split(), args.sweep_workdir)), flush=True)


if __name__ == '__main__':
  main()
