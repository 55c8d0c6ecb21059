"""Lever probe: conv1 (1 input channel) as 9 shifted slices + a 9x16 matmul vs lax.conv, whole train step.

  python bench/probe_conv1.py [--core=0] [--reps=3] [--batch_size=64]

Same parameters for both (the slices form reads conv1's kernel), interleaved repetitions, one pinned core.
Prints one JSON line: samples/s of each form (median, spread) and their ratio. Not used by training.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  common.add_common_flags(parser)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--seconds', type=float, default=2.0)
  args = parser.parse_args()
  common.pin(args.core)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, common.ROOT)
  from cnn_caption.models import classifier  # pylint: disable=g-import-not-at-top

  model = classifier.FashionCNN()
  x = jnp.asarray(np.random.default_rng(0).random((args.batch_size, 28, 28, 1), np.float32))
  y = jnp.asarray(np.random.default_rng(1).integers(0, 10, args.batch_size))
  params = model.init(jax.random.key(0), x[:1])['params']

  def conv1_slices(p, x_BxHxWx1):
    xp = jnp.pad(x_BxHxWx1[..., 0], ((0, 0), (1, 1), (1, 1)))
    h, w = x_BxHxWx1.shape[1:3]
    patches_BxHxWx9 = jnp.stack([xp[:, i : i + h, j : j + w] for i in range(3) for j in range(3)], -1)
    return patches_BxHxWx9 @ p['conv1']['kernel'].reshape(9, -1) + p['conv1']['bias']

  def forward(p, x, slices):
    if not slices:
      return model.apply({'params': p}, x, train=True, rngs={'dropout': jax.random.key(2)})
    # The same network with conv1 replaced: apply the tail of the model by hand (same layers, same order).
    h = classifier.max_pool_2x2(jax.nn.relu(conv1_slices(p, x)))
    h = (
      jax.lax.conv_general_dilated(h, p['conv2']['kernel'], (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      + p['conv2']['bias']
    )
    h = classifier.max_pool_2x2(jax.nn.relu(h))
    h = jnp.transpose(h, (0, 3, 1, 2)).reshape(h.shape[0], -1)
    h = jax.nn.relu(h @ p['fc1']['kernel'] + p['fc1']['bias'])
    keep = jax.random.bernoulli(jax.random.key(2), 0.5, h.shape)
    h = jnp.where(keep, h / 0.5, 0)
    h = jax.nn.relu(h @ p['fc2']['kernel'] + p['fc2']['bias'])
    return jax.nn.log_softmax(h @ p['fc3']['kernel'] + p['fc3']['bias'])

  def make(slices):
    return common.timed_sgd_steps(lambda p: forward(p, x, slices), params, y, args.seconds)

  diff = float(
    jnp.abs(
      conv1_slices(params, x)
      - jax.lax.conv_general_dilated(
        x, params['conv1']['kernel'], (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
      )
      - params['conv1']['bias']
    ).max()
  )
  results = common.interleave(args.reps, {'conv': make(False), 'slices': make(True)})
  common.emit(
    common.compare(
      'probe_conv1',
      f'train_b{args.batch_size}',
      'samples/s',
      results['slices'],
      {'conv': results['conv']},
      None,
      None,
      max_abs_diff_conv1=diff,
      note='project = slices form, peer = lax.conv form (both JAX)',
    )
  )


if __name__ == '__main__':
  main()
