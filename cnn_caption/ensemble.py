"""Decode with several trained captioners at once (e.g. seeds): the mean of their word probabilities.

  python -m cnn_caption.ensemble --out=runs/ens WORKDIR [WORKDIR ...] [--val_beam_sizes=1,3,5]

Every workdir must be a finished captioning run of the same architecture and vocabulary (seeds of one
config; the first one's config names the data and feature cache). Each step of greedy or beam search scores
a word by the log of the members' mean probability (decoders.greedy_decode / beam_search with ensemble=True,
the members' parameters stacked on a leading axis). The decoding (beam size, length penalty) is chosen on
val by the selection metric, exactly as a training run's `config.decoding.val_beam_sizes` does, then test is
scored with every coco metric. Writes OUT/results.json and OUT/test_captions.json (per-image CIDEr-D and
ROUGE-L, so `python -m cnn_caption.compare OUT OTHER` works). One line and exit code 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from cnn_caption.errors import UserError


def ensemble_results(workdirs: list[str], out: str, beam_sizes=(1,), length_penalties=(1.0,)) -> dict:
  """Chooses the decoding on val, scores test, writes OUT/results.json and OUT/test_captions.json."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from cnn_caption import io_utils  # pylint: disable=g-import-not-at-top
  from cnn_caption import parallel  # pylint: disable=g-import-not-at-top
  from cnn_caption.tasks import captioning  # pylint: disable=g-import-not-at-top

  if len(workdirs) < 2:
    raise UserError(f'an ensemble needs at least 2 workdirs, got {len(workdirs)}')
  if len(set(map(os.path.realpath, workdirs))) != len(workdirs):
    raise UserError('the same workdir is named twice; pass each member once')
  members = [captioning.load_trained(w) for w in workdirs]
  config, vocab, _, _ = members[0]
  for w, (c, v, _, _) in zip(workdirs[1:], members[1:]):
    if v != vocab:
      raise UserError(f'{w} has another vocabulary than {workdirs[0]}; ensemble runs trained on the same data')
    if c.model.to_dict() != config.model.to_dict():
      raise UserError(f'{w} has another model ({c.model.to_dict()}) than {workdirs[0]}; ensemble one architecture')
  config = captioning.share_data_of(config.copy_and_resolve_references(), workdirs[0])
  config.decoding.val_beam_sizes = tuple(beam_sizes)
  config.decoding.val_length_penalties = tuple(length_penalties)
  os.makedirs(out, exist_ok=True)
  task = captioning.CaptioningTask(config, out, parallel.make_mesh())
  if task.vocab != vocab:
    raise UserError(f'the data of {workdirs[0]} now gives another vocabulary than it was trained with')
  task.ensemble = True
  stacked = jax.tree.map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]), *(m[3] for m in members))
  results = task.final_results(None, stacked, out)
  results['ensemble_of'] = [os.path.abspath(w) for w in workdirs]
  io_utils.write_json(os.path.join(out, 'results.json'), results)
  return results


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('workdirs', nargs='+')
  parser.add_argument('--out', required=True, help='folder for results.json and test_captions.json')
  parser.add_argument('--val_beam_sizes', default='1', help='beam sizes tried on val, e.g. 1,3,5 (1 = greedy)')
  parser.add_argument('--val_length_penalties', default='1.0', help='length penalties tried on val with beams > 1')
  args = parser.parse_args(argv)
  try:
    try:
      sizes = tuple(int(v) for v in args.val_beam_sizes.split(',') if v)
      penalties = tuple(float(v) for v in args.val_length_penalties.split(',') if v)
    except ValueError:
      raise UserError(
        f'--val_beam_sizes={args.val_beam_sizes!r} / --val_length_penalties={args.val_length_penalties!r} '
        'must be comma-separated numbers, e.g. 1,3,5 and 0.7,1.0'
      ) from None
    if not sizes or min(sizes) < 1 or not penalties:
      raise UserError(f'--val_beam_sizes={args.val_beam_sizes!r} must list beam sizes >= 1, e.g. 1,3,5')
    results = ensemble_results(args.workdirs, args.out, sizes, penalties)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  shown = {k: round(v, 4) for k, v in results.items() if k.startswith('test_') and isinstance(v, float)}
  print(json.dumps({'decoding': results['decoding'], **shown}, indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(main())
