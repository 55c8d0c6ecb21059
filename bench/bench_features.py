"""Frozen-feature extraction: encoder forward next to PyTorch, then UCM first and cached runs. JSON lines.

  python bench/bench_features.py --peer_python=/work/peer-venv/bin/python   # pinned to core 0, 3 reps
  python bench/bench_features.py --limit=200 --encoder_batch=16 --core=-1   # all cores, no peer

First the encoder forward alone (the jitted function extraction runs, real weights, random images) and,
with --peer_python, a PyTorch EfficientNet-Lite0 forward of the same layout (bench/common.py, random weights,
channels-last, one thread), interleaved on the pinned core: images/s per core and the ratio. Then the
extraction over the UCM images, computing and cached (skipped with a note when the images are absent).

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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

ROOT = common.ROOT


def make_forward(encoder: str, weights, image_size: int, batch: int, seconds: float):
  """The extraction's jitted encoder call on random images; returns a function -> images/s."""
  import jax
  import numpy as np

  sys.path.insert(0, ROOT)
  from cnn_caption.captioning import features
  from cnn_caption.models import encoders

  module, variables = encoders.load_encoder(encoder, weights)
  forward = jax.jit(features._encode, static_argnums=0)
  x = np.random.default_rng(0).normal(size=(batch, image_size, image_size, 3)).astype(np.float32)
  jax.block_until_ready(forward(module, variables, x))

  def run() -> float:
    calls, t0 = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - t0 < seconds:
      out = forward(module, variables, x)
      calls += 1
    jax.block_until_ready(out)
    return calls * batch / (time.perf_counter() - t0)

  return run


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  default_ucm = os.environ.get('CNN_CAPTION_UCM_DIR') or os.path.join(ROOT, '..', 'shared', 'data', 'ucm_captions')
  parser.add_argument('--ucm_dir', default=default_ucm)
  parser.add_argument('--encoder', default='efficientnet_lite0')
  parser.add_argument('--weights', default=None)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--encoder_batch', type=int, default=32)
  parser.add_argument('--limit', type=int, default=0, help='first N images only; 0 = all')
  parser.add_argument('--cache_dir', default=None, help='keep the cache here instead of a temp dir')
  parser.add_argument('--seconds', type=float, default=3.0, help='forward seconds per repetition')
  common.add_common_flags(parser)
  args = parser.parse_args()
  common.pin(args.core)
  common.emit(common.header(args, 'features'))
  sides = {'project': make_forward(args.encoder, args.weights, args.image_size, args.encoder_batch, args.seconds)}
  if args.peer_python and args.encoder == 'efficientnet_lite0':
    sides['torch'] = lambda: common.torch_lite0(args, args.image_size, args.encoder_batch)
  results = common.interleave(args.reps, sides)
  common.emit(
    common.compare(
      'features',
      f'{args.encoder}_forward_{args.image_size}px',
      'images/s',
      results['project'],
      {'torch_channels_last': results.get('torch', [])},
      None,
      None,
      batch_size=args.encoder_batch,
      cores=sorted(os.sched_getaffinity(0)),
    )
  )

  paths = sorted(
    glob.glob(os.path.join(args.ucm_dir, 'images', '*.jpg')),
    key=lambda p: int(os.path.splitext(os.path.basename(p))[0]),
  )
  if not paths:
    common.emit(
      {
        'bench': 'features',
        'what': 'extraction',
        'note': f'no images under {args.ucm_dir}/images; extraction skipped (pass --ucm_dir)',
      }
    )
    return 0
  if args.limit:
    paths = paths[: args.limit]
  sys.path.insert(0, ROOT)
  from absl import logging

  from cnn_caption.captioning import features

  logging.set_verbosity(logging.INFO)
  cache_dir = args.cache_dir or tempfile.mkdtemp(prefix='bench_features_')
  try:
    for run in ('first', 'cached'):
      start = time.time()
      feats, ok = features.extract_features(
        args.encoder, args.weights, paths, args.image_size, cache_dir, batch_size=args.encoder_batch
      )
      seconds = time.time() - start
      print(
        json.dumps(
          {
            'run': run,
            'encoder': args.encoder,
            'images': len(paths),
            'ok': int(ok.sum()),
            'image_size': args.image_size,
            'encoder_batch': args.encoder_batch,
            'feats_shape': list(feats.shape),
            'dtype': str(feats.dtype),
            'seconds': round(seconds, 2),
            'images_per_s': round(len(paths) / seconds, 1),
            'cpus': len(os.sched_getaffinity(0)),
          }
        ),
        flush=True,
      )
  finally:
    if args.cache_dir is None:
      shutil.rmtree(cache_dir, ignore_errors=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
