"""The homework train step under XLA option sets (config.xla_options), interleaved on one pinned core.

  python bench/bench_xla_options.py --core=1                        # the built-in sets, batch 8 and 64
  python bench/bench_xla_options.py --sets='vec512=xla_cpu_prefer_vector_width=512;none=' --batch_sizes=64

Each set compiles the trainer's own step (bench_classifier.make_project) with those options; all sets are
timed in turn, --reps repetitions of --seconds each; one JSON line per set and batch size with its median
samples/s and the ratio to the config's own options ('default'). A set that XLA refuses is reported, not timed.
"""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_classifier import make_project
import common

SETS = (
  'xla_defaults=',  # the homework config sets YNNPACK fusion types of its own (configs/classifier.py)
  'ynn_fusions_off=xla_cpu_experimental_ynn_fusion_type=',
  'ynn_reduce_only=xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE',
  'ynn_one_dot_reduce=xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE',
  'vector_width_512=xla_cpu_prefer_vector_width=512',
  'onednn=xla_cpu_use_onednn=true',
  'xnnpack=xla_cpu_use_xnnpack=true',
  'one_thread_eigen=xla_cpu_multi_thread_eigen=false',
  'fast_math=xla_cpu_enable_fast_math=true',
  'no_fusion_emitters=xla_cpu_use_fusion_emitters=false',
  'concurrency_scheduler=xla_cpu_enable_concurrency_optimized_scheduler=true',
)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  common.add_common_flags(parser)
  parser.add_argument('--batch_sizes', default='8,64')
  parser.add_argument('--steps_per_call', type=int, default=8, help="the classifier config's default")
  parser.add_argument('--seconds', type=float, default=2.0, help='seconds per repetition and set')
  parser.add_argument('--sets', default=';'.join(SETS), help="'name=options;...', options as config.xla_options")
  args = parser.parse_args()
  common.pin(args.core)
  common.emit(common.header(args, 'xla_options'))
  sets = dict(item.split('=', 1) for item in args.sets.split(';') if item.strip())
  for batch_size in (int(b) for b in args.batch_sizes.split(',')):
    sides = {'default': make_project(batch_size, args.steps_per_call, args.seconds)}
    for name, options in sets.items():
      try:
        sides[name] = make_project(batch_size, args.steps_per_call, args.seconds, xla_options=options)
      except Exception as e:  # pylint: disable=broad-except  (XLA refuses an option: report it, time the rest)
        common.emit({'bench': 'xla_options', 'batch_size': batch_size, 'set': name, 'error': str(e).splitlines()[0]})
    results = common.interleave(args.reps, sides)
    base = statistics.median(results['default'])
    for name, values in results.items():
      record = {'bench': 'xla_options', 'batch_size': batch_size, 'set': name, 'options': sets.get(name, 'config')}
      record.update(samples_per_s=common.spread(values), ratio=round(statistics.median(values) / base, 3))
      common.emit(record)


if __name__ == '__main__':
  main()
