"""Accelerator check in one short run: smoke training of all three models, then peak device memory.

Prints one JSON line per run: the device, samples/s of training, seconds, peak device memory (where the
backend reports it) and the final figures. Run by bench/device_check.sh, which adds the benchmarks.

  python bench/device_check.py --workdir=/tmp/device_check [--fmnist_dir=DIR] [--ucm_dir=DIR]
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'configs'))


def _peak_bytes() -> int | None:
  import jax

  stats = jax.devices()[0].memory_stats() or {}
  return stats.get('peak_bytes_in_use')


def _run(name: str, config, workdir: str) -> None:
  import jax

  from cnn_caption import train
  from cnn_caption.errors import UserError

  t0 = time.time()
  try:
    results = train.train_and_evaluate(config, os.path.join(workdir, name))
  except UserError as e:
    print(json.dumps({'check': name, 'error': str(e)}), flush=True)
    return
  samples = results.get('num_train', 0) * results['epochs_trained']
  record = {
    'check': name,
    'device': jax.devices()[0].device_kind,
    'devices': jax.device_count(),
    'half_precision': bool(config.get('half_precision')),
    'seconds': round(time.time() - t0, 1),
    'train_seconds': round(results['train_seconds'], 2),
    'peak_device_bytes': _peak_bytes(),
    'figures': {
      k: v for k, v in results.items() if k.startswith(('test_', 'best_val_')) and isinstance(v, (int, float))
    },
  }
  if samples and results['train_seconds']:
    record['train_samples_per_s'] = round(samples / results['train_seconds'], 1)
  print(json.dumps(record), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default='/tmp/device_check')
  parser.add_argument('--fmnist_dir', default=None, help='Fashion-MNIST IDX folder (default: the Debian path)')
  parser.add_argument('--ucm_dir', default=None, help='UCM-captions folder for a real-data captioning run')
  args = parser.parse_args()
  import captioner
  import captioner_attention
  import classifier
  import jax

  print(
    json.dumps(
      {
        'check': 'device',
        'platform': jax.devices()[0].platform,
        'device': jax.devices()[0].device_kind,
        'devices': jax.device_count(),
        'jax': jax.__version__,
      }
    ),
    flush=True,
  )
  for half in (False, True):
    suffix = '_bf16' if half else ''
    config = classifier.get_config('smoke')
    config.half_precision = half
    if args.fmnist_dir:
      config.data.dir = args.fmnist_dir
    _run('classifier_smoke' + suffix, config, args.workdir)
    for name, module in (('captioner_smoke', captioner), ('attention_smoke', captioner_attention)):
      config = module.get_config('smoke')
      config.half_precision = half
      config.encoder.cache_dir = os.path.join(args.workdir, 'features_smoke')
      _run(name + suffix, config, args.workdir)
  if args.ucm_dir and os.path.isdir(args.ucm_dir):
    config = captioner_attention.get_config()
    config.data.dir = args.ucm_dir
    config.num_epochs = 1
    config.batch_size = 32
    config.encoder.cache_dir = os.path.join(args.workdir, 'features_ucm')
    _run('attention_ucm_1_epoch_b32', config, args.workdir)  # includes extracting all 2,100 images' features


if __name__ == '__main__':
  main()
