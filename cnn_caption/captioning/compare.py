"""Are two captioners different on the same test images? A paired bootstrap over their per-image scores.

  python -m cnn_caption.captioning.compare WORKDIR_A WORKDIR_B [--resamples=10000] [--seed=0]

Reads each workdir's test_captions.json (written by every captioning run, and by --mode=baselines for each
baseline in WORKDIR/baselines/NAME: per-image CIDEr-D and ROUGE-L),
pairs the images by name and prints, per metric, both means, the mean difference A - B, its 95%
percentile-bootstrap interval and the fraction of resamples in which A is not better. Exit code 2 with
one line when a workdir lacks the file or the two were scored on different images. A page of the per-image
differences (sortable, with thumbnails): launch.py --mode=compare --workdir=A --compare_to=B.
"""

from __future__ import annotations

if __name__ == '__main__':  # before numpy and absl are imported: a stop is one line from the start
  from cnn_caption import stop_signals

  stop_signals.install(lambda: 'while comparing; nothing is written, run the same command again')

from collections.abc import Sequence
import json
import os
import sys

from absl import app
from absl import flags
import numpy as np

from cnn_caption.captioning import metrics
from cnn_caption.errors import UserError

METRICS = ('cider', 'rouge_l')


def _per_image(workdir: str) -> dict[str, dict]:
  path = os.path.join(workdir, 'test_captions.json')
  try:
    with open(path, encoding='utf-8') as f:
      rows = json.load(f)
    return {r['image_name']: r for r in rows}
  except OSError as e:
    raise UserError(f'{path}: {e.strerror}; pass the workdir of a finished captioning run') from None
  except (ValueError, KeyError, TypeError) as e:
    raise UserError(f'{path} is not a test_captions.json ({e}); rerun the captioning command to rewrite it') from None


def compare(workdir_a: str, workdir_b: str, *, resamples: int = 10000, seed: int = 0) -> dict[str, dict]:
  """{metric: {'mean_a', 'mean_b', 'mean_diff', 'low', 'high', 'p_a_not_better'}} over the shared test images."""
  a, b = _per_image(workdir_a), _per_image(workdir_b)
  if set(a) != set(b):
    raise UserError(
      f'{workdir_a} and {workdir_b} captioned different test images ({len(set(a) ^ set(b))} differ): '
      'compare runs on the same data and split'
    )
  names = sorted(a)
  out = {}
  for metric in METRICS:
    sa = np.array([a[n][metric] for n in names], np.float64)
    sb = np.array([b[n][metric] for n in names], np.float64)
    ci = metrics.paired_bootstrap_ci(sa, sb, num_resamples=resamples, seed=seed)
    out[metric] = {'mean_a': float(sa.mean()), 'mean_b': float(sb.mean()), **ci}
  return out


def _define_flags() -> None:
  """The command's flags, defined only when this module is the program: importing it adds none."""
  flags.DEFINE_integer('resamples', 10000, 'Bootstrap resamples of the test images.', lower_bound=1)
  flags.DEFINE_integer('seed', 0, 'Seed of the resampling.')


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, a bad flag ending in one line and exit code 2 like any bad input."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f'error: {str(e).splitlines()[0]}; see --help', file=sys.stderr)
    sys.exit(2)


def main(argv: Sequence[str]) -> int:
  workdirs = argv[1:]
  resamples, seed = flags.FLAGS.resamples, flags.FLAGS.seed
  try:
    if len(workdirs) != 2:
      raise UserError(f'expected two workdirs (A and B), got {len(workdirs)}: {" ".join(workdirs) or "none"}')
    result = compare(*workdirs, resamples=resamples, seed=seed)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'A = {workdirs[0]}\nB = {workdirs[1]}\npaired bootstrap over test images, {resamples} resamples')
  for metric, r in result.items():
    print(
      f'  {metric}: A {r["mean_a"]:.4f}  B {r["mean_b"]:.4f}  A-B {r["mean_diff"]:+.4f}  '
      f'95% CI [{r["low"]:+.4f}, {r["high"]:+.4f}]  P(A not better) {r["p_a_not_better"]:.3f}'
    )
  return 0


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=_parse_flags)
