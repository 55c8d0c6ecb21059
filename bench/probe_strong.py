"""Speed probe for configs/classifier.py:strong (or --variant=resnet): training images/s of candidate shapes, one core.

  python bench/probe_strong.py [--core=1] [--seconds=4] [--candidates='{"wide": {"channels": [64, 128, 256]}}']
  python bench/probe_strong.py --variant=resnet --candidates='{"default": {}, "narrow": {"widths": [48, 96, 192]}}'

Each candidate is a dict of config.model overrides on the variant; the timed call is the trainer's own
`jax.jit(train.train_steps)` with the variant's optimizer and batch size, on random data of
Fashion-MNIST's shape prepared before timing (no host augmentation). Prints one JSON line per candidate:
parameter count, images/s and the projected seconds of one 50,000-image epoch. Not used by training.
"""

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT_CANDIDATES = {
  'default': {},
  'group_norm': {'norm': 'group'},
  'one_conv_per_stage': {'convs_per_stage': (1, 1, 1)},
  'wide': {'channels': (32, 96, 192), 'hidden': 512},
}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--core', type=int, default=1, help='core to pin to; -1 leaves affinity')
  parser.add_argument('--seconds', type=float, default=4.0, help='timed seconds per candidate')
  parser.add_argument('--candidates', default=None, help='JSON {name: {model field: value}}; default: a built-in set')
  parser.add_argument('--batch_size', type=int, default=0, help="0 = the variant's")
  parser.add_argument('--variant', default='strong', help='configs/classifier.py variant the candidates modify')
  args = parser.parse_args()
  common.pin(args.core)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, common.ROOT)
  from cnn_caption import models  # pylint: disable=g-import-not-at-top
  from cnn_caption import train  # pylint: disable=g-import-not-at-top
  from cnn_caption.tasks import classification  # pylint: disable=g-import-not-at-top
  from cnn_caption.training import optim  # pylint: disable=g-import-not-at-top
  from configs import classifier  # pylint: disable=g-import-not-at-top

  candidates = json.loads(args.candidates) if args.candidates else DEFAULT_CANDIDATES
  config = classifier.get_config(args.variant)
  b = args.batch_size or config.batch_size
  rng = np.random.default_rng(0)
  batches = [
    {
      'image': rng.random((1, b, 28, 28, 1), np.float32),
      'label': rng.integers(0, 10, (1, b)).astype(np.int32),
    }
    for _ in range(4)
  ]
  common.emit(
    {
      'what': 'context',
      'date_utc': time.strftime('%Y-%m-%d %H:%M'),
      'cpu': common.cpu_model(),
      'affinity': sorted(os.sched_getaffinity(0)),
      'batch_size': b,
      'jax': jax.__version__,
    }
  )
  for name, fields in candidates.items():
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    model = models.create_model(config, **fields)
    tx = optim.make_optimizer(config.optimizer, 10_000)
    state = train.create_train_state(model, models.example_inputs(config), jax.random.key(0), tx)
    num_params = sum(p.size for p in jax.tree.leaves(state.params))
    step = jax.jit(
      functools.partial(train.train_steps, task=classification.ClassificationTask, num_steps=1), donate_argnums=0
    )
    key = jax.random.key(1)
    state, m = step(state, batches[0], key)
    jax.block_until_ready(m)
    run = {'state': state, 'calls': 0}

    def advance(run=run, step=step, key=key):
      run['state'], metrics = step(run['state'], batches[run['calls'] % 4], key)
      run['calls'] += 1
      return metrics

    ips = common.calls_per_second(advance, args.seconds) * b
    common.emit(
      {
        'what': name,
        'fields': fields,
        'params': num_params,
        'multiply_adds': model.multiply_adds() if hasattr(model, 'multiply_adds') else None,
        'images_per_s': round(ips, 1),
        'epoch_s': round(50_000 / ips, 1),
      }
    )


if __name__ == '__main__':
  main()
