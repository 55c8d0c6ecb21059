"""Data-parallel scaling on this machine: 1 process x 1 device, 1 process x 2 devices, 2 processes x 1 device.

  python bench/bench_scaling.py                 # classifier (batch 64) and attention captioner (batch 32)
  python bench/bench_scaling.py --only=classifier --repeats=3
  python bench/bench_scaling.py --only=classifier --batch_size=8 --steps_per_call=8   # the homework's shape

Times the code that trains: real `launch.py` runs (Fashion-MNIST; the synthetic captioning set at 224 px,
features cached once and shared), reading the trainer's own "samples/s" progress lines of process 0 and
keeping the median of all but the first interval (which includes compilation). The layouts run one after
another and, with --repeats, interleaved. Prints one JSON line per layout and run.
"""

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = (('1x1', 1, 1), ('1x2', 1, 2), ('2x1', 2, 1))  # (name, processes, devices per process)
RATE = re.compile(r'epoch \d+ step \d+/\d+ .* ([\d.]+) examples/s')


def model_args(name: str, shared: str, batch_size: int = 64, steps_per_call: int = 1) -> list[str]:
  if name == 'classifier':
    return [
      '--config=configs/classifier.py',
      f'--config.batch_size={batch_size}',
      f'--config.data.num_train={200 * batch_size * steps_per_call}',
      '--config.data.num_eval=1000',
      '--config.num_epochs=1',
      f'--config.log_every_steps={20 * steps_per_call}',
      f'--config.steps_per_call={steps_per_call}',
    ]
  return [
    '--config=configs/captioner_attention.py',
    '--config.batch_size=32',
    '--config.num_epochs=1',
    '--config.data.synthetic_num_images=150',
    f'--config.data.synthetic_dir={shared}/synthetic',
    f'--config.encoder.cache_dir={shared}/features',
    '--config.log_every_steps=4',
    '--config.eval_batch_size=16',
  ]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def run_layout(args: list[str], processes: int, devices: int, workdir: str) -> list[float]:
  """Samples/s intervals logged by process 0 of one run."""
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}' if devices > 1 else '',
  )
  port = free_port()
  procs = []
  for i in range(processes):
    cmd = [sys.executable, 'launch.py', *args, f'--workdir={workdir}']
    if processes > 1:
      cmd += [f'--coordinator_address=localhost:{port}', f'--num_processes={processes}', f'--process_id={i}']
    procs.append(
      subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE if i == 0 else subprocess.DEVNULL,
        text=True,
      )
    )
  err = procs[0].communicate(timeout=1200)[1]
  for p in procs[1:]:
    p.wait(timeout=120)
  if any(p.returncode for p in procs):
    raise RuntimeError(f'run failed ({[p.returncode for p in procs]}):\n{err[-2000:]}')
  return [float(m.group(1)) for m in RATE.finditer(err)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--only', choices=('classifier', 'attention'))
  parser.add_argument('--repeats', type=int, default=1)
  parser.add_argument('--batch_size', type=int, default=64, help="the classifier's (200 calls of steps_per_call steps)")
  parser.add_argument('--steps_per_call', type=int, default=1, help="the classifier's")
  flags = parser.parse_args()
  models = [flags.only] if flags.only else ['classifier', 'attention']
  with tempfile.TemporaryDirectory() as tmp:
    for model in models:
      args = model_args(model, tmp, flags.batch_size, flags.steps_per_call)
      for rep in range(flags.repeats):
        for name, processes, devices in LAYOUTS:
          t0 = time.time()
          rates = run_layout(args, processes, devices, os.path.join(tmp, f'{model}_{name}_{rep}'))
          steady = rates[1:] or rates
          print(
            json.dumps(
              {
                'bench': 'scaling',
                'model': model,
                'layout': name,
                'processes': processes,
                'devices_per_process': devices,
                'batch_size': flags.batch_size if model == 'classifier' else 32,
                'steps_per_call': flags.steps_per_call if model == 'classifier' else None,
                'samples_per_s': round(statistics.median(steady), 1),
                'intervals': len(steady),
                'wall_s': round(time.time() - t0, 1),
                'cores': len(os.sched_getaffinity(0)),
                'load_avg_1m': round(os.getloadavg()[0], 2),
              }
            ),
            flush=True,
          )


if __name__ == '__main__':
  main()
