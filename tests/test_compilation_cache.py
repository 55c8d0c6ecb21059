"""launch.py keeps compiled programs between runs: where (flag, jax's setting, the user's cache folder) and off."""

import os

import jax
import pytest

from cnn_caption import cli
from conftest import run_launch

CHECK = ('--config=configs/equivariance.py', '--mode=equivariance_check')


@pytest.fixture
def jax_cache_dir():
  """Restores jax's compilation cache settings that a test changes."""
  names = ('jax_compilation_cache_dir', 'jax_enable_compilation_cache', 'jax_persistent_cache_min_compile_time_secs')
  saved = {name: getattr(jax.config, name) for name in names}
  yield
  for name, value in saved.items():
    jax.config.update(name, value)


def test_cache_folder_precedence(tmp_path, monkeypatch, jax_cache_dir):
  assert cli.compilation_cache_dir('/flag/dir') == '/flag/dir'
  assert cli.compilation_cache_dir('') is None
  jax.config.update('jax_compilation_cache_dir', '/from/jax')  # $JAX_COMPILATION_CACHE_DIR or --jax_...
  assert cli.compilation_cache_dir(None) == '/from/jax'
  assert cli.compilation_cache_dir('/flag/dir') == '/flag/dir'
  jax.config.update('jax_compilation_cache_dir', None)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert cli.compilation_cache_dir(None) == str(tmp_path / 'xdg' / 'cnn_caption' / 'jax')
  monkeypatch.delenv('XDG_CACHE_HOME')
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert cli.compilation_cache_dir(None) == str(tmp_path / 'home' / '.cache' / 'cnn_caption' / 'jax')


def test_use_compilation_cache_sets_jax_options(monkeypatch, jax_cache_dir):
  monkeypatch.delenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', raising=False)
  cli.use_compilation_cache('/some/dir')
  assert jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir == '/some/dir'
  assert jax.config.jax_persistent_cache_min_compile_time_secs == cli.CACHE_MIN_COMPILE_SECS
  # A threshold the user set is theirs.
  monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '2.5')
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 2.5)
  cli.use_compilation_cache('/some/dir')
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 2.5
  cli.use_compilation_cache(None)
  assert not jax.config.jax_enable_compilation_cache


def _entries(folder) -> list[str]:
  return [n for n in os.listdir(folder) if n.endswith('-cache')] if os.path.isdir(folder) else []


@pytest.mark.slow
def test_launch_writes_the_cache_where_told(tmp_path, monkeypatch):
  monkeypatch.delenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', raising=False)  # the default threshold
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'env'))
  # The flag over the variable (which jax reads, as test_cache_folder_precedence checks in-process).
  done = run_launch(*CHECK, f'--compilation_cache_dir={tmp_path / "flag"}')
  assert done.returncode == 0, done.stderr[-2000:]
  assert _entries(tmp_path / 'flag') and not _entries(tmp_path / 'env'), os.listdir(tmp_path)
  assert f'compiled programs are kept in {tmp_path / "flag"}' in done.stderr
  # Off: nothing written where the variable points (--compilation_cache_dir= is the same setting: '' above).
  done = run_launch(*CHECK, '--nocompilation_cache')
  assert done.returncode == 0 and not _entries(tmp_path / 'env'), done.stderr[-2000:]
  # Neither flag nor variable: the user's cache folder.
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  done = run_launch(*CHECK)
  assert done.returncode == 0, done.stderr[-2000:]
  assert _entries(tmp_path / 'xdg' / 'cnn_caption' / 'jax')
