"""Image captioning with additive attention over image regions, homework question 3b.

  python launch.py --config=configs/captioner_attention.py --workdir=runs/cap                  # synthetic scenes
  python launch.py --config=configs/captioner_attention.py --config.data.dir=DATA --workdir=runs/ucm_att

Expected: on the synthetic scenes (no data needed, seed 0), test BLEU-4 0.768 in about 2 minutes on 2 cores.
On UCM-captions (docs/data.md), mean of seeds 0, 1, 2, corpus BLEU-4 on test:
  the command above (best epoch by val BLEU-4, greedy decoding): 0.653;
  with `--config.decoding.method=beam --config.decoding.beam_size=3`: 0.691;
  with `--config.selection_metric=cider --config.early_stopping_patience=2` and the decoding chosen on val
  (`--config.decoding.val_beam_sizes='(1,3,5)' --config.decoding.val_length_penalties='(0.0,0.5,1.0)'`):
  BLEU-4 0.694 +- 0.011, CIDEr-D 3.449 +- 0.092.
Measured on 2-core x86 VMs (AMD EPYC for the CIDEr-D protocol), CPU, jax 0.10.2, 2026-11. On one core (AMD
EPYC): about 130 s per UCM epoch, after about 2 minutes of feature extraction the first time.

Variants: as configs/captioner.py (`smoke`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import captioner  # noqa: E402  (configs/ is not a package: ml_collections loads files by path)


def get_config(arg: str | None = None):
  config = captioner.get_config(arg)
  config.model.attention_dim = 100  # score_j = v^T act(W1 h + W2 s_j), this is their width
  return config
