"""Lever probe: the homework classifier's training step in NHWC (the project's layout) vs NCHW, same parameters.

  python bench/probe_layout.py [--core=0] [--reps=3] [--batch_sizes=8,64]

Both forms are written out by hand with lax.conv_general_dilated (NHWC: HWIO kernels; NCHW: the same kernels
transposed to OIHW), so only the layout differs; the NHWC form is checked against FashionCNN.apply and the NCHW
form against the NHWC form (max |difference| of the log-probabilities in the record). Interleaved repetitions,
one pinned core. One JSON line per batch size: samples/s of each layout (median, spread) and their ratio.
Not used by training.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  common.add_common_flags(parser)
  parser.add_argument('--batch_sizes', default='8,64')
  parser.add_argument('--seconds', type=float, default=2.0)
  args = parser.parse_args()
  common.pin(args.core)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, common.ROOT)
  from cnn_caption.models import classifier  # pylint: disable=g-import-not-at-top

  model = classifier.FashionCNN()
  params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))['params']

  def conv(x, kernel_hwio, bias, padding, layout):
    if layout == 'NHWC':
      return (
        jax.lax.conv_general_dilated(x, kernel_hwio, (1, 1), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + bias
      )
    kernel_oihw = jnp.transpose(kernel_hwio, (3, 2, 0, 1))
    out = jax.lax.conv_general_dilated(x, kernel_oihw, (1, 1), padding, dimension_numbers=('NCHW', 'OIHW', 'NCHW'))
    return out + bias[:, None, None]

  def pool(x, layout):
    if layout == 'NHWC':
      return classifier.max_pool_2x2(x)
    b, c, h, w = x.shape
    return x[:, :, : h // 2 * 2, : w // 2 * 2].reshape(b, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))

  def forward(p, x_nhwc, layout, dropout_key):
    x = x_nhwc if layout == 'NHWC' else jnp.transpose(x_nhwc, (0, 3, 1, 2))
    h = pool(jax.nn.relu(conv(x, p['conv1']['kernel'], p['conv1']['bias'], 'SAME', layout)), layout)
    h = pool(jax.nn.relu(conv(h, p['conv2']['kernel'], p['conv2']['bias'], 'VALID', layout)), layout)
    if layout == 'NHWC':  # FashionCNN flattens in (C, H, W) order, as the homework's PyTorch model did
      h = jnp.transpose(h, (0, 3, 1, 2))
    h = jax.nn.relu(h.reshape(h.shape[0], -1) @ p['fc1']['kernel'] + p['fc1']['bias'])
    if dropout_key is not None:
      keep = jax.random.bernoulli(dropout_key, 0.5, h.shape)
      h = jnp.where(keep, h / 0.5, 0)
    h = jax.nn.relu(h @ p['fc2']['kernel'] + p['fc2']['bias'])
    return jax.nn.log_softmax(h @ p['fc3']['kernel'] + p['fc3']['bias'])

  for batch_size in [int(b) for b in args.batch_sizes.split(',')]:
    x = jnp.asarray(np.random.default_rng(0).random((batch_size, 28, 28, 1), np.float32))
    y = jnp.asarray(np.random.default_rng(1).integers(0, 10, batch_size))
    reference = model.apply({'params': params}, x, train=False)
    diff_model = float(jnp.abs(forward(params, x, 'NHWC', None) - reference).max())
    diff_layout = float(jnp.abs(forward(params, x, 'NCHW', None) - reference).max())

    def make(layout, x=x, y=y):
      return common.timed_sgd_steps(lambda p: forward(p, x, layout, jax.random.key(2)), params, y, args.seconds)

    results = common.interleave(args.reps, {'NHWC': make('NHWC'), 'NCHW': make('NCHW')})
    common.emit(
      common.compare(
        'probe_layout',
        f'train_b{batch_size}',
        'samples/s',
        results['NCHW'],
        {'NHWC': results['NHWC']},
        None,
        None,
        max_abs_diff_nhwc_vs_model=diff_model,
        max_abs_diff_nchw_vs_model=diff_layout,
        note='project = NCHW form, peer = NHWC form (both JAX, hand-written, same parameters)',
      )
    )


if __name__ == '__main__':
  main()
