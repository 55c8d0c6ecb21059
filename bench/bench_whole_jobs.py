"""Whole jobs, before and after: the homework run and the homework sweep of two checkouts. JSON lines.

  python bench/bench_whole_jobs.py --before=/tmp/before --jobs=run      # the two runs side by side, one core each
  python bench/bench_whole_jobs.py --before=/tmp/before --jobs=sweep    # the two sweeps one after the other

`--before` is another checkout of this repository (e.g. `git worktree add /tmp/before <commit>`); "after" is
this one. Both run with this interpreter. `run`: `launch.py --config=configs/classifier.py` of each checkout,
started together, each pinned to its own core (so they share the machine's memory bandwidth alike).
`sweep`: `configs/classifier.py:sweep` on all cores, before then after. Each line: wall time, peak RSS of the
process tree (sampled every 0.5 s from /proc) and the metrics the job wrote.
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def start(root: str, config: str, workdir: str, core: int | None, extra: list[str]) -> dict:
  cmd = [
    sys.executable,
    os.path.join(root, 'launch.py'),
    f'--config={os.path.join(root, config)}',
    f'--workdir={workdir}',
  ]
  if core is not None:
    cmd = ['taskset', '-c', str(core), *cmd]
  job = common.start_job([*cmd, *extra], cwd=root)
  job.update(root=root, config=config, workdir=workdir, core=core)
  return job


def finish(job: dict, label: str) -> dict:
  measured = common.finish_job(job)
  out = {
    'bench': 'whole_jobs',
    'checkout': label,
    'commit': subprocess.run(
      ['git', '-C', job['root'], 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True, check=False
    ).stdout.strip(),
    'config': job['config'],
    'core': job['core'],
    **measured,
  }
  results = os.path.join(job['workdir'], 'results.json')
  if measured['rc'] == 0 and os.path.exists(results):
    with open(results) as f:
      r = json.load(f)
    if 'runs' in r:
      out['runs'] = [{k: run.get(k) for k in ('learning_rate', 'val_accuracy', 'test_accuracy')} for run in r['runs']]
    else:
      out['metrics'] = {k: v for k, v in r.items() if isinstance(v, (int, float))}
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--before', required=True, help='the other checkout')
  parser.add_argument('--jobs', default='run,sweep')
  parser.add_argument('--workdir', default='/tmp/bench_whole_jobs')
  parser.add_argument('--extra', default='', help='extra launch.py flags for every job, space separated')
  args = parser.parse_args()
  extra = args.extra.split()
  checkouts = {'before': os.path.abspath(args.before), 'after': common.ROOT}
  common.emit(
    {
      'bench': 'whole_jobs',
      'what': 'context',
      'date_utc': time.strftime('%Y-%m-%d %H:%M', time.gmtime()),
      'cpu': common.cpu_model(),
      'cores_online': os.cpu_count(),
      'loadavg': os.getloadavg(),
    }
  )
  jobs = args.jobs.split(',')
  if 'run' in jobs:
    running = {
      label: start(root, 'configs/classifier.py', os.path.join(args.workdir, f'run_{label}'), core, extra)
      for core, (label, root) in enumerate(checkouts.items())
    }
    for label, job in running.items():
      common.emit(finish(job, label))
  if 'sweep' in jobs:
    for label, root in checkouts.items():
      job = start(root, 'configs/classifier.py:sweep', os.path.join(args.workdir, f'sweep_{label}'), None, extra)
      common.emit(finish(job, label))


if __name__ == '__main__':
  main()
