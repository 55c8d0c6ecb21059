"""Homework question 2.1: which layers commute with translations of their input, checked numerically.

  python launch.py --config=configs/equivariance.py --mode=equivariance_check

The layers are the homework CNN's (configs/classifier.py): a 3x3 convolution, the 2x2 max pool and a
fully connected layer, with random weights and a random image.
Expected: `7 of 7 checks passed.` and exit code 0 (1 if any check fails). Time: not measured.
"""

from ml_collections import config_dict


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  config = config_dict.ConfigDict()
  config.seed = 0  # the random image and the random layer weights

  config.check = config_dict.ConfigDict()
  config.check.image_shape = (28, 28, 1)  # H, W, C of the random input (Fashion-MNIST's)
  config.check.channels = 16  # output channels of the convolution (the homework's conv1)
  config.check.kernel_size = 3  # the convolution's kernel is kernel_size x kernel_size
  config.check.fc_units = 120  # units of the fully connected layer
  config.check.shift = (3, 5)  # the translation (rows, columns) in pixels; odd, so the 2x2 pool cannot follow it
  config.check.same_rtol = 1e-5  # max |f(Tx) - T f(x)| / max |f(x)| counted as equal (float32)
  config.check.differ_rtol = 1e-2  # ... counted as different
  if arg not in (None, ''):
    raise ValueError(f'unknown variant {arg!r} of configs/equivariance.py; it has none')
  return config
