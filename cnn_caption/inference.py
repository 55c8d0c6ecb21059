"""Using trained captioners: captions for new images, and seed ensembles decoded together.

  python -m cnn_caption.inference --out=runs/ens WORKDIR [WORKDIR ...] [--val_beam_sizes=1,3,5]

`Captioner` captions image files with a training workdir's best parameters (greedy decoding; `--mode=caption`).
`ensemble_results` decodes with several trained captioners at once (e.g. seeds): every step of greedy or beam
search scores a word by the log of the members' mean probability (the members' parameters stacked on a leading
axis). Every workdir must be a finished captioning run of the same architecture and vocabulary (the first one's
config names the data and feature cache). The decoding (beam size, length penalty) is chosen on val by the
selection metric, exactly as a training run's `config.decoding.val_beam_sizes` does, then test is scored with
every coco metric. Writes OUT/results.json and OUT/test_captions.json (per-image CIDEr-D and ROUGE-L, so
`python -m cnn_caption.captioning.compare OUT OTHER` works). One line and exit code 2 on bad input, a bad
flag included (absl flags: --help lists them).
"""

from __future__ import annotations

_WRITTEN = []  # not empty once OUT/results.json is written


def _when_stopped() -> str:
  if _WRITTEN:
    return 'while exiting; the results were written'
  return 'before the results were written; run the same command again'


if __name__ == '__main__':  # before jax is imported (seconds): a stop is one line from the start
  from cnn_caption import stop_signals

  stop_signals.install(_when_stopped)

from collections.abc import Sequence
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnn_caption import io_utils
from cnn_caption import models
from cnn_caption.data import augment
from cnn_caption.data import images as images_lib
from cnn_caption.data import vocab as vocab_lib
from cnn_caption.errors import UserError
from cnn_caption.models import decoders
from cnn_caption.models import encoders
from cnn_caption.tasks import captioning
from cnn_caption.training import checkpoint as checkpoint_lib
from cnn_caption.training import parallel


def load_trained(workdir: str):
  """(config, vocab, model, params) from a training workdir alone."""
  config_path = os.path.join(workdir, captioning.CONFIG_FILE)
  if not os.path.exists(config_path):
    raise UserError(f'{config_path} not found: --workdir must be a captioning training workdir')
  try:
    with open(config_path, encoding='utf-8') as f:
      saved = json.load(f)
    if not isinstance(saved, dict) or 'encoder' not in saved or 'model' not in saved:
      raise ValueError('not a captioning config (no "encoder" or "model" group)')
  except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    raise UserError(
      f'{config_path} is not a readable captioning config ({str(e).splitlines()[0]}); '
      'it is written by --mode=train: retrain or restore the file'
    ) from None
  config = ml_collections.ConfigDict(saved)
  try:
    captioning.CaptioningTask.validate_config(config)
  except UserError as e:
    raise UserError(
      f'{config_path} holds an impossible value ({str(e).split(" (set --config")[0]}); it is written by '
      '--mode=train: restore the file or retrain'
    ) from None
  vocab = vocab_lib.Vocab.load(os.path.join(workdir, captioning.VOCAB_FILE))
  scene = {}
  classes_path = os.path.join(workdir, captioning.SCENE_CLASSES_FILE)
  if os.path.exists(classes_path):  # written when the run trained a scene head
    with open(classes_path, encoding='utf-8') as f:
      scene = {'scene_head': True, 'scene_classes': len(json.load(f))}
  elif config.model.get('scene_head'):
    scene = {'scene_head': False}  # its data had no classes: trained without the head
  model = models.create_model(config, vocab_size=len(vocab), **scene)
  found = checkpoint_lib.best_params(workdir)
  if found is not None:
    directory, step, params = found
    logging.info('caption: parameters from %s/%d', directory, step)
    return config, vocab, model, params
  raise UserError(f'no checkpoint in {workdir}: train first with --mode=train --workdir={workdir}')


class Captioner:
  """Captions new image files with a trained workdir's best parameters (greedy decoding)."""

  def __init__(self, workdir: str):
    self.config, self.vocab, model, self.params = load_trained(workdir)
    encoder, variables = encoders.load_encoder(self.config.encoder.name, self.config.encoder.weights)
    layer = captioning.feature_layer(self.config)
    self._encode = jax.jit(lambda x: encoder.apply(variables, x, features_only=True, layer=layer))
    self.dihedral = self.config.data.get('dihedral_test', False)  # decode the mean of the 8 transforms
    self._decode = jax.jit(
      lambda p, f: decoders.greedy_decode(
        model, p, f, bos_id=self.vocab.bos_id, eos_id=self.vocab.eos_id, max_len=self.config.decoding.max_len
      )
    )

  def caption(self, path: str) -> tuple[list[str], np.ndarray | None]:
    """(words, attention TxN or None) for one image file; UserError if it cannot be read."""
    pixels = images_lib.load_image(path, self.config.data.image_size, self.config.encoder.name)
    if self.dihedral:  # as the run's val and test: region maps rotated back, then averaged
      views = np.asarray(self._encode(np.stack([augment.dihedral(pixels, t) for t in range(augment.NUM_DIHEDRAL)])))
      feats = np.mean([augment.undo_dihedral_regions(v, t) for t, v in enumerate(views)], axis=0)[None]
    else:
      feats = self._encode(pixels[None])
    tokens, alphas = self._decode(self.params, feats.astype(jnp.float32))
    words = self.vocab.decode(np.asarray(tokens[0]).tolist())
    return words, None if alphas is None else np.asarray(alphas[0])


def ensemble_results(workdirs: list[str], out: str, beam_sizes=(1,), length_penalties=(1.0,)) -> dict:
  """Chooses the decoding on val, scores test, writes OUT/results.json and OUT/test_captions.json."""
  if len(workdirs) < 2:
    raise UserError(f'an ensemble needs at least 2 workdirs, got {len(workdirs)}')
  if len(set(map(os.path.realpath, workdirs))) != len(workdirs):
    raise UserError('the same workdir is named twice; pass each member once')
  members = [load_trained(w) for w in workdirs]
  config, vocab, _, _ = members[0]
  for w, (c, v, _, _) in zip(workdirs[1:], members[1:]):
    if v != vocab:
      raise UserError(f'{w} has another vocabulary than {workdirs[0]}; ensemble runs trained on the same data')
    if c.model.to_dict() != config.model.to_dict():
      raise UserError(f'{w} has another model ({c.model.to_dict()}) than {workdirs[0]}; ensemble one architecture')
  config = captioning.share_data_of(config.copy_and_resolve_references(), workdirs[0])
  config.decoding.val_beam_sizes = tuple(beam_sizes)
  config.decoding.val_length_penalties = tuple(length_penalties)
  io_utils.prepare_workdir(out)
  task = captioning.CaptioningTask(config, out, parallel.make_mesh(), ensemble=True)
  if task.vocab != vocab:
    raise UserError(f'the data of {workdirs[0]} now gives another vocabulary than it was trained with')
  stacked = jax.tree.map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]), *(m[3] for m in members))
  results = task.final_results(None, stacked, out)
  results['ensemble_of'] = [os.path.abspath(w) for w in workdirs]
  io_utils.write_json(os.path.join(out, 'results.json'), results)
  return results


def decoding_choices(beam_sizes: Sequence[str], length_penalties: Sequence[str]) -> tuple[tuple, tuple]:
  """(beam sizes, length penalties) from the flags' comma-separated items; UserError if not numbers."""
  try:
    sizes = tuple(int(v) for v in beam_sizes if v)
    penalties = tuple(float(v) for v in length_penalties if v)
  except ValueError:
    raise UserError(
      f'--val_beam_sizes={",".join(beam_sizes)} / --val_length_penalties={",".join(length_penalties)} '
      'must be comma-separated numbers, e.g. 1,3,5 and 0.7,1.0'
    ) from None
  if not sizes or min(sizes) < 1 or not penalties:
    raise UserError(f'--val_beam_sizes={",".join(beam_sizes)} must list beam sizes >= 1, e.g. 1,3,5')
  return sizes, penalties


def _define_flags() -> None:
  """The command's flags, defined only when this module is the program: importing it (launch.py does) adds none."""
  flags.DEFINE_string('out', None, 'Folder for results.json and test_captions.json.')
  flags.DEFINE_list('val_beam_sizes', ['1'], 'Beam sizes tried on val, e.g. 1,3,5 (1 = greedy).')
  flags.DEFINE_list('val_length_penalties', ['1.0'], 'Length penalties tried on val with beams > 1.')


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, a bad flag ending in one line and exit code 2 like any bad input."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f'error: {str(e).splitlines()[0]}; see --help', file=sys.stderr)
    sys.exit(2)


def main(argv: Sequence[str]) -> int:
  workdirs, out = list(argv[1:]), flags.FLAGS.out
  try:
    if not out:
      raise UserError("--out is missing: pass the folder for the ensemble's results, e.g. --out=runs/ensemble")
    sizes, penalties = decoding_choices(flags.FLAGS.val_beam_sizes, flags.FLAGS.val_length_penalties)
    results = ensemble_results(workdirs, out, sizes, penalties)
    _WRITTEN.append(True)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  shown = {k: round(v, 4) for k, v in results.items() if k.startswith('test_') and isinstance(v, float)}
  print(json.dumps({'decoding': results['decoding'], **shown}, indent=1))
  return 0


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=_parse_flags)
