"""Homework question 1: the small CNN whose per-layer activations and parameters are counted.

  python launch.py --config=configs/q1_cnn.py --mode=summary

conv 8 kernels 5x5x3, stride 1, VALID -> max-pool 4x4 stride 2 -> linear 10 -> softmax.
Expected: the per-layer table, ending `Total parameters: 10,298` (conv 608, linear 9,690). Time: not measured.
"""

from ml_collections import config_dict


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  config = config_dict.ConfigDict()
  config.seed = 0  # init key for the (shape-only) summary

  config.model = config_dict.ConfigDict()
  config.model.name = 'q1_cnn'  # cnn_caption/models registry key
  config.model.input_shape = (28, 28, 3)  # height, width, channels of one image
  config.model.features = 8  # convolution kernels (output channels)
  config.model.kernel_size = (5, 5)  # kernel height, width (depth = input channels)
  config.model.strides = (1, 1)  # convolution stride
  config.model.padding = 'VALID'  # no padding: 28 - 5 + 1 = 24
  config.model.pool_window = (4, 4)  # max-pool window
  config.model.pool_strides = (2, 2)  # max-pool stride: (24 - 4) // 2 + 1 = 11
  config.model.num_classes = 10  # linear output units, then softmax

  if arg not in (None, ''):
    raise ValueError(f'unknown variant {arg!r} of configs/q1_cnn.py; it has none')
  return config
