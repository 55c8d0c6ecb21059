"""Homework question 1: the MLP compared with configs/q1_cnn.py on the same 28x28x3 input.

  python launch.py --config=configs/q1_mlp.py --mode=summary

flatten -> linear 100 -> linear 10 -> softmax.
Expected: the per-layer table, ending `Total parameters: 236,310` (hidden 235,300, output 1,010). Time: not
measured.
"""

from ml_collections import config_dict


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  config = config_dict.ConfigDict()
  config.seed = 0  # init key for the (shape-only) summary

  config.model = config_dict.ConfigDict()
  config.model.name = 'q1_mlp'  # cnn_caption/models registry key
  config.model.input_shape = (28, 28, 3)  # height, width, channels of one image (flattened: 2352)
  config.model.hidden_units = 100  # units of the first linear layer
  config.model.num_classes = 10  # linear output units, then softmax

  if arg not in (None, ''):
    raise ValueError(f'unknown variant {arg!r} of configs/q1_mlp.py; it has none')
  return config
