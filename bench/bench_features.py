"""Frozen-feature extraction over UCM-captions: first (computing) and cached run. Prints JSON lines.

  python bench/bench_features.py                      # all 2,100 images, 224 px, batch 32
  python bench/bench_features.py --limit=200 --encoder_batch=16
  taskset -c 1 python bench/bench_features.py         # pinned to one core

Each run starts from an empty temporary cache (removed afterwards) unless --cache_dir is given.
Target on 2 shared cores: the first run <= 60 s, the cached run a few seconds.
"""

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  default_ucm = os.environ.get('CNN_CAPTION_UCM_DIR') or os.path.join(ROOT, '..', 'shared', 'data',
                                                                      'ucm_captions')
  parser.add_argument('--ucm_dir', default=default_ucm)
  parser.add_argument('--encoder', default='efficientnet_lite0')
  parser.add_argument('--weights', default=None)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--encoder_batch', type=int, default=32)
  parser.add_argument('--limit', type=int, default=0, help='first N images only; 0 = all')
  parser.add_argument('--cache_dir', default=None, help='keep the cache here instead of a temp dir')
  args = parser.parse_args()

  paths = sorted(glob.glob(os.path.join(args.ucm_dir, 'images', '*.jpg')),
                 key=lambda p: int(os.path.splitext(os.path.basename(p))[0]))
  if not paths:
    print(f'error: no images under {args.ucm_dir}/images; pass --ucm_dir', file=sys.stderr)
    return 2
  if args.limit:
    paths = paths[:args.limit]
  sys.path.insert(0, ROOT)
  from absl import logging  # pylint: disable=g-import-not-at-top
  from cnn_caption import features  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  cache_dir = args.cache_dir or tempfile.mkdtemp(prefix='bench_features_')
  try:
    for run in ('first', 'cached'):
      start = time.time()
      feats, ok = features.extract_features(args.encoder, args.weights, paths, args.image_size,
                                            cache_dir, batch_size=args.encoder_batch)
      seconds = time.time() - start
      print(json.dumps({
          'run': run, 'encoder': args.encoder, 'images': len(paths), 'ok': int(ok.sum()),
          'image_size': args.image_size, 'encoder_batch': args.encoder_batch,
          'feats_shape': list(feats.shape), 'dtype': str(feats.dtype),
          'seconds': round(seconds, 2), 'images_per_s': round(len(paths) / seconds, 1),
          'cpus': len(os.sched_getaffinity(0))}), flush=True)
  finally:
    if args.cache_dir is None:
      shutil.rmtree(cache_dir, ignore_errors=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
