"""Shared benchmark helpers: pinning, the PyTorch peers in /work/shared/peers, interleaved repetitions, JSON lines.

Every bench script pins itself (and the peer subprocesses, through `taskset`) to one core before jax starts,
runs the project path and the peer alternately `reps` times, and prints one JSON line per compared path:
project and peer medians, their spread (min, max), the ratio of the medians, and the fraction of the machine's
float32 matmul ceiling (the peers' `cpu_peak.py`, one thread, measured in the same run) each path reaches.
"""

from __future__ import annotations

from collections.abc import Callable
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PEERS = os.path.join(ROOT, '..', 'shared', 'peers')


def add_common_flags(parser) -> None:
  parser.add_argument('--core', type=int, default=0, help='core to pin to (project and peer); -1 leaves affinity')
  parser.add_argument('--reps', type=int, default=3, help='interleaved repetitions per side (>= 3 for a spread)')
  parser.add_argument(
    '--peer_python',
    default=None,
    help='python of the PyTorch peer venv (e.g. /work/peer-venv/bin/python); none -> no peer',
  )
  parser.add_argument('--peers_dir', default=DEFAULT_PEERS, help='folder with torch_cnn.py, torch_captioner.py')
  parser.add_argument(
    '--profile', default=None, help='folder: after the timings, trace one more project run of each path there'
  )


def pin(core: int) -> None:
  """Pins this process to one core; call before importing jax so its thread pool sees one CPU."""
  if core >= 0:
    os.sched_setaffinity(0, {core})


def emit(record: dict) -> None:
  print(json.dumps(record), flush=True)


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def header(args, bench: str) -> dict:
  """The run's context line: machine, date, versions, pinning, load."""
  import jax

  record = {
    'bench': bench,
    'what': 'context',
    'date_utc': time.strftime('%Y-%m-%d %H:%M', time.gmtime()),
    'cpu': cpu_model(),
    'cores_online': os.cpu_count(),
    'affinity': sorted(os.sched_getaffinity(0)),
    'loadavg': os.getloadavg(),
    'jax': jax.__version__,
    'reps': args.reps,
    'peer_python': args.peer_python,
    'xla_flags': os.environ.get('XLA_FLAGS', ''),
  }
  if not args.peer_python:
    record['note'] = 'no --peer_python: PyTorch peers skipped, no ratios'
  return record


def _taskset(core: int) -> list[str]:
  return ['taskset', '-c', str(core)] if core >= 0 else []


def run_peer(args, script: str, flags: list[str], timeout: float = 600) -> list[dict]:
  """Runs one peer script pinned to the same core; returns its JSON lines."""
  cmd = [*_taskset(args.core), args.peer_python, os.path.join(args.peers_dir, script), *flags]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
  if out.returncode != 0:
    raise RuntimeError(f'peer {" ".join(cmd)} failed: {out.stderr[-500:]}')
  return [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{')]


def cpu_peak(args) -> float | None:
  """One-thread float32 sgemm ceiling in GFLOP/s (the peers' cpu_peak.py, best of its reps), same core."""
  python = args.peer_python or sys.executable
  script = os.path.join(args.peers_dir, 'cpu_peak.py')
  if not os.path.exists(script):
    return None
  cmd = [*_taskset(args.core), python, script, '--threads', '1', '--reps', '5']
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
  for line in out.stdout.splitlines():
    if line.startswith('{'):
      return json.loads(line)['gflops']
  return None


def spread(values: list[float]) -> dict:
  return {
    'median': round(statistics.median(values), 1),
    'min': round(min(values), 1),
    'max': round(max(values), 1),
    'runs': [round(v, 1) for v in values],
  }


def interleave(reps: int, sides: dict[str, Callable[[], float | dict | None]]) -> dict[str, list]:
  """Calls each side once per repetition, alternating, so slow phases of a shared machine hit all sides."""
  results = {name: [] for name in sides}
  for _ in range(reps):
    for name, fn in sides.items():
      value = fn()
      if value is not None:
        results[name].append(value)
  return results


def compare(
  bench: str,
  path: str,
  unit: str,
  project: list[float],
  peers: dict[str, list[float]],
  flops_per_unit: float | None,
  peak_gflops: float | None,
  **extra,
) -> dict:
  """One JSON record: project and every peer setup (median, spread), ratio to the best peer, fraction of peak."""
  record = {'bench': bench, 'path': path, 'unit': unit, 'project': spread(project)}
  best_name, best = None, None
  for name, values in peers.items():
    if not values:
      continue
    record[f'peer_{name}'] = spread(values)
    if best is None or statistics.median(values) > best:
      best_name, best = name, statistics.median(values)
  if best is not None:
    record['best_peer'] = best_name
    record['ratio_to_best_peer'] = round(statistics.median(project) / best, 2)
  if flops_per_unit and peak_gflops:
    record['cpu_peak_gflops'] = peak_gflops
    record['project_peak_fraction'] = round(statistics.median(project) * flops_per_unit / 1e9 / peak_gflops, 3)
    if best is not None:
      record['best_peer_peak_fraction'] = round(best * flops_per_unit / 1e9 / peak_gflops, 3)
  record.update(extra)
  return record


# A PyTorch EfficientNet-Lite0 forward (features only: stem, 16 blocks, 1x1 head to 1280; ReLU6, BatchNorm
# eps 1e-3, no squeeze-excitation), random weights, channels-last, one thread. Arguments: size batch reps.
TORCH_LITE0 = r"""
import json, sys, time, torch, torch.nn as nn
torch.set_num_threads(1)
size, batch, reps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def cbr(i, o, k, s, g=1):
  return [nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(o, eps=1e-3), nn.ReLU6()]
layers, c = cbr(3, 32, 3, 2), 32
for e, k, s, o, n in [(1,3,1,16,1),(6,3,2,24,2),(6,5,2,40,2),(6,3,2,80,3),(6,5,1,112,3),(6,5,2,192,4),(6,3,1,320,1)]:
  for j in range(n):
    h = c * e
    block = (cbr(c, h, 1, 1) if e != 1 else []) + cbr(h, h, k, s if j == 0 else 1, h)
    block += [nn.Conv2d(h, o, 1, bias=False), nn.BatchNorm2d(o, eps=1e-3)]
    layers.append(nn.Sequential(*block)); c = o
layers += cbr(c, 1280, 1, 1)
net = nn.Sequential(*layers).eval().to(memory_format=torch.channels_last)
x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
  for _ in range(2): net(x)
  t0 = time.perf_counter()
  for _ in range(reps): net(x)
  dt = time.perf_counter() - t0
print(json.dumps({'images_per_s': batch * reps / dt}))
"""


def torch_lite0(args, image_size: int, batch: int = 32, reps: int = 10) -> float | None:
  """Images/s of the PyTorch Lite0 forward above, pinned to the same core; None when it fails."""
  cmd = [*_taskset(args.core), args.peer_python, '-c', TORCH_LITE0, str(image_size), str(batch), str(reps)]
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{')]
  return lines[0]['images_per_s'] if lines else None


def profiled(trace_dir: str, fn: Callable[[], object]) -> dict:
  """Runs `fn` once inside a jax.profiler trace and summarises where XLA's time went.

  The trace (TensorBoard profile plugin / Perfetto) stays in `trace_dir`. The summary adds up the duration
  of every executed XLA:CPU thunk (trace events carrying an `hlo_op`), per op and per kind of op (the name
  without its numeric suffix: fusion, convolution, ynn_fusion (a YNNPACK matmul fusion), while, copy, ...),
  and gives each one's share of the total thunk time and the wall time of the call.
  """
  import collections
  import glob
  import gzip
  import re

  import jax

  before = set(glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'), recursive=True))
  t0 = time.perf_counter()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    fn()
  wall_us = (time.perf_counter() - t0) * 1e6
  (path,) = set(glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'), recursive=True)) - before
  with gzip.open(path) as f:
    data = json.load(f)
  events = data['traceEvents'] if isinstance(data, dict) else data
  per_op, per_kind, calls = collections.Counter(), collections.Counter(), collections.Counter()
  for e in events:
    op = (e.get('args') or {}).get('hlo_op')
    if e.get('ph') != 'X' or not op:
      continue
    per_op[op] += e['dur']
    calls[op] += 1
    per_kind[re.sub(r'[._]\d+$', '', op)] += e['dur']
  total = sum(per_op.values()) or 1.0
  # A while op's duration contains its body's thunks: report it, but do not count it twice in the shares.
  loops = {op for op in per_op if op.startswith('while')}
  inner = sum(v for op, v in per_op.items() if op not in loops) or 1.0
  return {
    'trace': path,
    'wall_ms': round(wall_us / 1e3, 1),
    'xla_ms': round(sum(v for op, v in per_op.items() if op not in loops) / 1e3, 1),
    'loop_ms': {op: round(per_op[op] / 1e3, 1) for op in sorted(loops)},
    'top_ops': [
      {'op': op, 'share': round(v / inner, 3), 'ms': round(v / 1e3, 1), 'calls': calls[op]}
      for op, v in per_op.most_common(14)
      if op not in loops
    ][:12],
    'kinds': {k: round(v / inner, 3) for k, v in per_kind.most_common() if not k.startswith('while')},
    'total_including_loops_ms': round(total / 1e3, 1),
  }


def tree_rss_mb(pid: int) -> float:
  """Resident memory of a process and all its descendants, from /proc."""
  total, stack = 0, [pid]
  while stack:
    p = stack.pop()
    try:
      with open(f'/proc/{p}/status') as f:
        for line in f:
          if line.startswith('VmRSS:'):
            total += int(line.split()[1])
      with open(f'/proc/{p}/task/{p}/children') as f:
        stack.extend(int(c) for c in f.read().split())
    except (FileNotFoundError, ProcessLookupError):
      pass
  return total / 1024


def start_job(cmd: list[str], cwd: str | None = None) -> dict:
  """Starts a whole job (quiet) and samples its process tree's peak RSS every 0.5 s until it ends."""
  job = {'peak': 0.0, 't0': time.time()}
  job['proc'] = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

  def sample():
    while job['proc'].poll() is None:
      job['peak'] = max(job['peak'], tree_rss_mb(job['proc'].pid))
      time.sleep(0.5)

  job['sampler'] = threading.Thread(target=sample, daemon=True)
  job['sampler'].start()
  return job


def finish_job(job: dict) -> dict:
  """Waits for a start_job job: {'rc', 'wall_s', 'peak_rss_mb'}."""
  rc = job['proc'].wait()
  wall = time.time() - job['t0']
  job['sampler'].join()
  return {'rc': rc, 'wall_s': round(wall, 1), 'peak_rss_mb': round(job['peak'], 1)}
