"""Entry point: flags only, then the command line module.

  python launch.py --config=configs/classifier.py --workdir=runs/fmnist
  python launch.py --config=configs/q1_cnn.py --mode=summary
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from cnn_caption import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path.py or path.py:variant).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, plots, results.')
_MODE = flags.DEFINE_enum('mode', 'train', list(cli.MODES), 'What to do with the config.')
_IMAGES = flags.DEFINE_list('images', [], 'Image paths for --mode=imagenet_predict / caption.')


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.main(_MODE.value, _CONFIG.value, _WORKDIR.value, _IMAGES.value)


if __name__ == '__main__':
  cli.run_app(main)
