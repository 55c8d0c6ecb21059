"""Lever probe: XLA:CPU flags, measured on the project's own benchmark paths, interleaved on one pinned core.

  python bench/probe_xla_flags.py [--core=0] [--reps=3] [--benches=classifier,decoders]

Each repetition runs bench_classifier.py (batch 8 and 64) and bench_decoders.py (plain and attention: train,
greedy, beam) once per flag set, as fresh processes with that XLA_FLAGS, alternating the flag sets so a
shared machine's slow phases hit all of them. Prints one JSON line per flag set and path: samples/s (or
captions/s) median and spread, and the ratio to the default flags. Flags that change floats (every one here
swaps a kernel library) would need the 15-epoch accuracy check before becoming a default.
"""

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAG_SETS = {
  'default': '',
  'no_ynnpack': '--xla_cpu_experimental_ynn_fusion_type=',
  'onednn': '--xla_cpu_use_onednn=true',
  'xnnpack': '--xla_cpu_use_xnnpack=true',
  'eigen_one_thread': '--xla_cpu_multi_thread_eigen=false',
  'no_ynnpack_onednn': '--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_onednn=true',
}


def run_bench(script: str, flags: str, args, extra: list[str]) -> dict[str, float]:
  env = dict(os.environ, XLA_FLAGS=flags)
  cmd = [sys.executable, os.path.join(common.ROOT, 'bench', script), f'--core={args.core}', '--reps=1', *extra]
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=1200)
  rates = {}
  for line in out.stdout.splitlines():
    if line.startswith('{'):
      record = json.loads(line)
      if 'project' in record and 'path' in record:
        rates[record['path']] = record['project']['median']
  if not rates:
    raise RuntimeError(f'{script} with XLA_FLAGS={flags!r} failed: {out.stderr[-500:]}')
  return rates


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--core', type=int, default=0)
  parser.add_argument('--reps', type=int, default=3)
  parser.add_argument('--benches', default='classifier,decoders')
  parser.add_argument('--flag_sets', default=','.join(FLAG_SETS))
  args = parser.parse_args()
  common.emit(
    {
      'bench': 'xla_flags',
      'what': 'context',
      'date_utc': common.time.strftime('%Y-%m-%d %H:%M', common.time.gmtime()),
      'cpu': common.cpu_model(),
      'core': args.core,
      'loadavg': os.getloadavg(),
      'reps': args.reps,
    }
  )
  benches = {
    'classifier': ('bench_classifier.py', ['--batch_sizes=8,64', '--seconds=3']),
    'decoders': ('bench_decoders.py', ['--seconds=2', '--min_calls=2']),
  }
  names = args.flag_sets.split(',')
  results = {name: {} for name in names}
  for _ in range(args.reps):
    for bench in args.benches.split(','):
      script, extra = benches[bench]
      for name in names:
        for path, rate in run_bench(script, FLAG_SETS[name], args, extra).items():
          results[name].setdefault(path, []).append(rate)
  for name in names:
    for path, values in results[name].items():
      record = {'bench': 'xla_flags', 'flags': name, 'xla_flags': FLAG_SETS[name], 'path': path}
      base = results.get('default', {}).get(path)
      record.update(common.spread(values), ratio_to_default=common.median_ratio(values, base))
      common.emit({key: v for key, v in record.items() if v is not None})


if __name__ == '__main__':
  main()
