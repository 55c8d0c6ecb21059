"""Classifier evaluation throughput under each set of XLA options, one pinned core, interleaved. Prints JSON lines.

  python bench/bench_eval.py --core=0                                  # homework, strong, resnet; 3 reps
  python bench/bench_eval.py --variants=default --options='|xla_cpu_experimental_ynn_fusion_type='

The timed call is the trainer's own: ClassificationTask.evaluate(params, 'val') on Fashion-MNIST's 10,000
validation images, at the config's eval_batch_size and test-time augmentation, the task built once per option
set (`--options`, '|'-separated config.eval_xla_options values; 'config' is the config's own, '' XLA's
defaults). Each record gives images/s per option set and each set's ratio of medians to XLA's defaults.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

ROOT = common.ROOT


def make_eval(variant: str, eval_xla_options: str):
  """Returns a function that evaluates the val split once and returns images/s (compiled on creation)."""
  import jax

  sys.path.insert(0, ROOT)
  from cnn_caption.tasks import classification
  from cnn_caption.training import parallel

  sys.path.insert(0, os.path.join(ROOT, 'configs'))
  import classifier

  config = classifier.get_config(None if variant == 'default' else variant)
  if eval_xla_options != 'config':
    config.eval_xla_options = eval_xla_options
  task = classification.ClassificationTask(config, '', parallel.make_mesh())
  params = task.model.init(jax.random.key(0), *task.example_inputs())['params']
  task.evaluate(params, 'val')  # compiles
  n = len(task.splits['val'][1])

  def run() -> float:
    t0 = time.perf_counter()
    task.evaluate(params, 'val')
    return n / (time.perf_counter() - t0)

  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  common.add_common_flags(parser)
  parser.add_argument('--variants', default='default,strong,resnet', help='configs/classifier.py variants')
  parser.add_argument('--options', default='|config', help="'|'-separated eval_xla_options ('config': its own)")
  args = parser.parse_args()
  common.pin(args.core)
  common.emit(common.header(args, 'classifier_eval'))
  option_sets = args.options.split('|')
  for variant in args.variants.split(','):
    sides = {options: make_eval(variant, options) for options in option_sets}
    results = common.interleave(args.reps, sides)
    base = statistics.median(results[option_sets[0]])
    common.emit(
      {
        'bench': 'classifier_eval',
        'variant': variant,
        'unit': 'images/s',
        'sets': {
          options: {**common.spread(values), 'ratio': round(statistics.median(values) / base, 2)}
          for options, values in results.items()
        },
      }
    )


if __name__ == '__main__':
  main()
