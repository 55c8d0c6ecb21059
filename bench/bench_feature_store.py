"""Feature store cost as the data set grows: peak RSS of training and feature extraction speed. JSON lines.

  python bench/bench_feature_store.py --sizes=1000,5000,20000 --image_size=96
  python bench/bench_feature_store.py --sizes=1000 --peer_python=/work/peer-venv/bin/python   # + torch Lite0

For each size, two fresh pinned child processes. The first builds the synthetic captioned-scenes set
(cnn_caption/data/synthetic.py) and constructs the real captioning task, which extracts the features into
the on-disk store (images/s of that extraction is reported per core). The second is a training process as a
resumed run starts one: it constructs the task (finding the store), then trains `--steps` jitted train steps
reading every batch through the task's `train_batch` (a random permutation of the captions, so reads are
spread over the whole store). Its peak RSS (VmHWM, the whole process from start to end) and steps/s are
reported. With --peer_python, a PyTorch EfficientNet-Lite0 forward written here (same layer layout, random
weights, channels-last, one thread) gives images/s on the same core.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

ROOT = common.ROOT


def _rss_mb() -> float:
  with open('/proc/self/status') as f:
    status = dict(line.split(':', 1) for line in f if ':' in line)
  return round(int(status['VmRSS'].split()[0]) / 1024, 1)


def child(args) -> None:
  """One size: build data, construct the task (extraction), then train and report peak RSS."""
  common.pin(args.core)
  import functools

  import jax
  import numpy as np

  sys.path.insert(0, ROOT)
  from cnn_caption import train
  from cnn_caption.data import synthetic
  from cnn_caption.tasks import captioning
  from cnn_caption.training import optim
  from cnn_caption.training import parallel

  sys.path.insert(0, os.path.join(ROOT, 'configs'))
  import captioner

  config = captioner.get_config()
  config.data.image_size = args.image_size
  config.data.synthetic_num_images = args.size
  config.data.synthetic_dir = os.path.join(args.workdir, f'synthetic_{args.size}_{args.image_size}')
  config.encoder.cache_dir = os.path.join(args.workdir, 'features')
  config.batch_size = args.batch_size
  if args.phase == 'extract':
    t0 = time.time()
    synthetic.make_synthetic_dataset(config.data.synthetic_dir, args.size, args.image_size, config.seed)
    data_s = time.time() - t0
    t0 = time.time()
    captioning.CaptioningTask(config, args.workdir, parallel.make_mesh())
    extract_s = time.time() - t0
    common.emit(
      {
        'data_s': round(data_s, 1),
        'extract_and_task_s': round(extract_s, 1),
        'extract_images_per_s_per_core': round(args.size / extract_s, 1),
      }
    )
    return
  task = captioning.CaptioningTask(config, args.workdir, parallel.make_mesh())
  task_rss_mb = _rss_mb()
  tx = optim.make_optimizer(config.optimizer, 1000)
  state = train.create_train_state(task.model, task.example_inputs(), jax.random.key(0), tx)
  step = jax.jit(functools.partial(train.train_step, task=task), donate_argnums=0)
  order = np.random.default_rng(0).permutation(task.num_train)
  key = jax.random.key(1)
  state, m = step(state, task.train_batch(order[: config.batch_size], 0), key)
  jax.block_until_ready(m)
  t0 = time.time()
  for i in range(1, args.steps + 1):
    idx = order[(i * config.batch_size) % (task.num_train - config.batch_size) :][: config.batch_size]
    state, m = step(state, task.train_batch(idx, i), key)
  jax.block_until_ready(m)
  steps_s = args.steps / (time.time() - t0)
  status = dict(line.split(':', 1) for line in open('/proc/self/status') if ':' in line)
  common.emit(
    {
      'bench': 'feature_store',
      'images': args.size,
      'image_size': args.image_size,
      'feats_shape': list(task.feats['train'].shape),
      'feats_type': type(task.feats['train']).__name__,
      'store_mb': round(
        sum(
          os.path.getsize(os.path.join(r, n))
          for r, _, ns in os.walk(config.encoder.cache_dir)
          for n in ns
          if n.startswith('store-')
        )
        / 2**20,
        1,
      ),
      'task_rss_mb': task_rss_mb,
      'train_peak_rss_mb': round(int(status['VmHWM'].split()[0]) / 1024, 1),
      'train_steps_per_s': round(steps_s, 2),
      'batch_size': config.batch_size,
      'cores': sorted(os.sched_getaffinity(0)),
    }
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  common.add_common_flags(parser)
  parser.add_argument('--sizes', default='1000,5000,20000')
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--workdir', default=None, help='default: a temporary folder')
  parser.add_argument('--size', type=int, default=0, help=argparse.SUPPRESS)  # child mode
  parser.add_argument('--phase', default='train', help=argparse.SUPPRESS)  # child mode: extract | train
  args = parser.parse_args()
  if args.size:
    child(args)
    return
  workdir = args.workdir or tempfile.mkdtemp(prefix='bench_store_')
  common.pin(args.core)
  common.emit(common.header(args, 'feature_store'))
  for size in (int(s) for s in args.sizes.split(',')):
    record = {}
    for phase in ('extract', 'train'):
      cmd = [
        sys.executable,
        __file__,
        f'--size={size}',
        f'--phase={phase}',
        f'--core={args.core}',
        f'--image_size={args.image_size}',
        f'--steps={args.steps}',
        f'--batch_size={args.batch_size}',
        f'--workdir={workdir}',
      ]
      out = subprocess.run(cmd, capture_output=True, text=True, check=False)
      lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{')]
      if out.returncode or not lines:
        record = {'bench': 'feature_store', 'images': size, 'phase': phase, 'error': out.stderr[-800:]}
        break
      for line in lines:
        record.update(line)
    common.emit(record)
  if args.peer_python:
    rate = common.torch_lite0(args, args.image_size)
    common.emit(
      {
        'bench': 'feature_store',
        'what': 'torch_lite0_forward',
        'image_size': args.image_size,
        'images_per_s_per_core': None if rate is None else round(rate, 1),
        'note': 'forward only, random weights; the project figure above also decodes images, writes '
        'the cache and compiles; bench_features.py compares the forwards alone',
      }
    )


if __name__ == '__main__':
  main()
