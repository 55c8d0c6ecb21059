"""Self-critical sequence training (CIDEr-D reward) of a cross-entropy-trained captioner.

  python launch.py --config=configs/captioner_scst.py:plain --config.data.dir=DATA \
      --config.init_from=XE_WORKDIR --config.optimizer.learning_rate=1e-4 --config.num_epochs=10 \
      --workdir=SCST_WORKDIR

Variants: (none) the attention decoder of configs/captioner_attention.py; `plain` the plain decoder of
configs/captioner.py; `smoke` / `plain_smoke` the smoke sizes. The model, data and encoder settings
must be those of the run in config.init_from (its best parameters are the starting point).

Expected on UCM-captions test, mean of seeds 0, 1, 2, with the command above (learning rate 1e-4 and 10
epochs, chosen on val; the defaults below are 5e-5 and 5), XE_WORKDIR trained with
`--config.selection_metric=cider --config.early_stopping_patience=2`, and the decoding chosen on val
(`--config.decoding.val_beam_sizes='(1,3,5)' --config.decoding.val_length_penalties='(0.0,0.5,1.0)'`):
  plain:     CIDEr-D 3.567 +- 0.061, BLEU-4 0.687 +- 0.008;
  attention: CIDEr-D 3.557 +- 0.074, BLEU-4 0.681 +- 0.018.
AMD EPYC, 2 cores, CPU, jax 0.10.2, 2026-11 (docs/results.md). Time on one core: not measured.
"""

import os
import sys

from ml_collections import config_dict

sys.path.insert(0, os.path.dirname(__file__))
import captioner  # noqa: E402  (configs/ is not a package: ml_collections loads files by path)


def get_config(arg: str | None = None):
  variants = {None: (None, True), '': (None, True), 'plain': (None, False), 'smoke': ('smoke', True)}
  variants['plain_smoke'] = ('smoke', False)
  if arg not in variants:
    raise ValueError(f'unknown variant {arg!r} of configs/captioner_scst.py; use plain, smoke or plain_smoke')
  base, attention = variants[arg]
  config = captioner.get_config(base)
  if attention:
    config.model.attention_dim = 100  # as configs/captioner_attention.py
  config.task = 'scst'
  config.init_from = config_dict.placeholder(str)  # cross-entropy workdir whose best parameters start SCST

  config.scst = config_dict.ConfigDict()
  config.scst.num_samples = 5  # captions sampled per image and step
  config.scst.baseline = 'mean'  # 'mean' of the image's other samples, or the 'greedy' caption's CIDEr-D

  config.batch_size = 16  # images per step (each with num_samples sampled captions)
  config.optimizer.learning_rate = 5e-5  # Adam, constant: a small step away from the cross-entropy optimum
  config.num_epochs = 5  # passes over the training images
  config.selection_metric = 'cider'  # SCST optimises CIDEr-D: the epoch is chosen by val CIDEr-D
  config.steps_per_call = 1  # required: each step samples with the parameters of the step before
  if arg in ('smoke', 'plain_smoke'):
    config.batch_size = 8
    config.num_epochs = 2
  return config
