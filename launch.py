"""Entry point: flags only, then dispatch to the library.

  python launch.py --config=configs/classifier.py --workdir=runs/fmnist
  python launch.py --config=configs/q1_cnn.py --mode=summary
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path.py or path.py:variant).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, plots, results.')
_MODE = flags.DEFINE_enum(
    'mode', 'train', ['train', 'summary', 'attention_check', 'imagenet_predict', 'caption'],
    'What to do with the config.')
_IMAGES = flags.DEFINE_list('images', [], 'Image paths for --mode=imagenet_predict / caption.')


def _run(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from cnn_caption import config_utils  # pylint: disable=g-import-not-at-top
  mode, workdir = _MODE.value, _WORKDIR.value
  if mode == 'caption':
    from cnn_caption import captioning  # pylint: disable=g-import-not-at-top
    return captioning.caption_main(config_utils.require_workdir(workdir, mode), _IMAGES.value)
  config = config_utils.require_config(_CONFIG.value)
  config_utils.validate(config)
  if mode == 'train':
    from cnn_caption import train  # pylint: disable=g-import-not-at-top
    train.train_and_evaluate(config, config_utils.require_workdir(workdir, mode))
    return 0
  if mode == 'summary':
    from cnn_caption import analysis  # pylint: disable=g-import-not-at-top
    return analysis.print_summary(config)
  if mode == 'attention_check':
    from cnn_caption import analysis  # pylint: disable=g-import-not-at-top
    return 0 if analysis.attention_check(config) else 1
  if mode == 'imagenet_predict':
    from cnn_caption import imagenet  # pylint: disable=g-import-not-at-top
    return imagenet.predict_main(config, _IMAGES.value)
  raise app.UsageError(f'--mode={mode} is not handled')


def main(argv):
  from cnn_caption.errors import UserError  # pylint: disable=g-import-not-at-top
  try:
    code = _run(argv)
  except UserError as e:
    logging.flush()
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  sys.exit(code)


if __name__ == '__main__':
  from cnn_caption import config_utils  # pylint: disable=g-import-not-at-top
  config_utils.run_app(main)
