"""What a run records about itself: the resolved config (logged and in config.json) and its environment."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess

from absl import logging
import jax
import ml_collections

from cnn_caption import io_utils
from cnn_caption.training import parallel

CONFIG_FILE = 'config.json'


def package_version() -> str | None:
  try:
    return importlib.metadata.version('cnn_caption')
  except importlib.metadata.PackageNotFoundError:
    return None


def git_commit(path: str | None = None) -> str | None:
  """HEAD of the git checkout holding `path` (default: this package), '+dirty' when changed; None without git."""
  path = path or os.path.dirname(os.path.abspath(__file__))
  try:
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=path, capture_output=True, text=True, timeout=10)
    if head.returncode != 0:
      return None
    status = subprocess.run(
      ['git', 'status', '--porcelain', '--untracked-files=no'], cwd=path, capture_output=True, text=True, timeout=10
    )
  except (OSError, subprocess.SubprocessError):
    return None
  dirty = status.returncode == 0 and bool(status.stdout.strip())
  return head.stdout.strip() + ('+dirty' if dirty else '')


def usable_cpus() -> int:
  """The CPUs this process may run on (its affinity mask where the OS has one)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)


def cpu_threads() -> int:
  """The size of XLA:CPU's intra-op thread pool: $NPROC where it is a number, else the CPUs this process may use.

  It changes how XLA:CPU rounds a step (docs/usage.md): runs reproduce bit for bit only at the same size.
  """
  value = os.environ.get('NPROC', '').strip()
  if value.isdigit():
    return int(value)
  return usable_cpus()


def environment() -> dict:
  """Package, JAX and device facts for results.json."""
  devices = jax.devices()
  return {
    'cnn_caption_version': package_version(),
    'jax_version': jax.__version__,
    'backend': jax.default_backend(),
    'device_kind': devices[0].device_kind,
    'device_count': jax.device_count(),
    'process_count': jax.process_count(),
    'cpu_threads': cpu_threads(),  # XLA:CPU's thread pool, which sets its rounding
    'git_commit': git_commit(),
  }


def config_text(config: ml_collections.ConfigDict) -> str:
  """The resolved config as indented JSON (what config.json holds)."""
  return json.dumps(io_utils.jsonable(config.to_dict()), indent=2, sort_keys=True)


def record_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Logs the resolved config and writes <workdir>/config.json (process 0) before any training."""
  logging.info('config:\n%s', config_text(config))
  if parallel.is_main_process():
    os.makedirs(workdir, exist_ok=True)
    io_utils.write_json(os.path.join(workdir, CONFIG_FILE), config.to_dict())
