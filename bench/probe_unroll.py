"""Lever probe: `unroll=` of the decoders' training time scan, interleaved on one pinned core.

  python bench/probe_unroll.py [--core=0] [--reps=3] [--unrolls=1,2,4,8] [--variants=plain,attention]

Builds bench_decoders.py's project paths (the real train_step and caption loss at the peer's shape) once per
unroll factor, with cnn_caption.models.decoders' scan rebuilt with that `unroll`, and times training
alternately. Prints one JSON line per variant and factor: samples/s median and spread, ratio to unroll=1.
"""

import argparse
import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--core', type=int, default=0)
  parser.add_argument('--reps', type=int, default=3)
  parser.add_argument('--unrolls', default='1,2,4,8')
  parser.add_argument('--variants', default='plain,attention')
  parser.add_argument('--seconds', type=float, default=3.0)
  args = parser.parse_args()
  common.pin(args.core)
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, common.ROOT)
  import bench_decoders  # pylint: disable=g-import-not-at-top

  from cnn_caption.models import decoders  # pylint: disable=g-import-not-at-top

  common.emit({'bench': 'scan_unroll', 'what': 'context', 'cpu': common.cpu_model(), 'loadavg': os.getloadavg()})
  bench_args = types.SimpleNamespace(seconds=args.seconds, min_calls=2)
  sides = {}
  for variant in args.variants.split(','):
    for unroll in (int(u) for u in args.unrolls.split(',')):
      decoders._scan_steps = nn.scan(  # pylint: disable=protected-access
        decoders._scan_body,  # pylint: disable=protected-access
        variable_broadcast='params',
        split_rngs={'params': False},
        in_axes=(0, nn.broadcast),
        out_axes=0,
        unroll=unroll,
      )
      sides[(variant, unroll)] = bench_decoders.make_project(variant, bench_args)['train']
  results = common.interleave(args.reps, sides)
  for (variant, unroll), values in results.items():
    record = {'bench': 'scan_unroll', 'variant': variant, 'unroll': unroll, 'unit': 'samples/s'}
    record.update(common.spread(values), ratio_to_unroll_1=common.median_ratio(values, results.get((variant, 1))))
    common.emit({key: v for key, v in record.items() if v is not None})


if __name__ == '__main__':
  main()
