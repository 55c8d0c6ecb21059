"""Shared test helpers: paths, data availability, running launch.py in a subprocess."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST_DIR = '/usr/share/datasets/fashion-mnist'
UCM_DIR = os.environ.get('CNN_CAPTION_UCM_DIR', os.path.join(ROOT, '..', 'shared', 'data', 'ucm_captions'))


def has_fashion_mnist() -> bool:
  return os.path.exists(os.path.join(FMNIST_DIR, 'train-images-idx3-ubyte.gz'))


needs_fmnist = pytest.mark.skipif(not has_fashion_mnist(),
                                  reason=f'Fashion-MNIST not in {FMNIST_DIR} (apt-get install dataset-fashion-mnist)')


def run_launch(*args: str, devices: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
  """Runs launch.py in a fresh interpreter (optionally with N fake CPU devices)."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}' if devices > 1 else ''
  env['JAX_PLATFORMS'] = 'cpu'
  return subprocess.run([sys.executable, os.path.join(ROOT, 'launch.py'), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f]


def strip_timing(records: list[dict]) -> list[dict]:
  return [{k: v for k, v in r.items() if 'seconds' not in k} for r in records]


def override(config, **fields):
  """Sets dotted config fields, e.g. override(c, **{'optimizer.learning_rate': 0.1})."""
  for key, value in fields.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config
