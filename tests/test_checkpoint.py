"""Checkpoints and the run record: save, restore, fall back, refuse; the XLA:CPU pool size across a resume."""

import json
import os
import shutil
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cnn_caption import train
from cnn_caption.errors import UserError
from cnn_caption.training import checkpoint
from cnn_caption.training import run_record
from conftest import strong_smoke


def _state(value: float) -> dict:
  value = float(value)
  return {'params': {'w': jnp.full((3, 2), value), 'b': jnp.arange(2.0) + value}, 'step': jnp.asarray(int(value))}


def test_save_restore_and_fall_back_past_a_damaged_newest(tmp_path, caplog):
  directory = str(tmp_path / 'checkpoints')
  ckpt = checkpoint.Checkpointer(directory, max_to_keep=3)
  for step in (1, 2):
    ckpt.save(step, _state(step), {'epoch': step})
  ckpt.save(2, _state(99.0), {'epoch': 99})  # a step already saved is kept as it is
  assert ckpt.all_steps() == [1, 2] and ckpt.read_meta(2) == {'epoch': 2}
  step, state, meta = ckpt.restore_intact(_state(0.0))
  assert step == 2 and meta == {'epoch': 2}
  np.testing.assert_array_equal(np.asarray(state['params']['w']), np.full((3, 2), 2.0))
  np.testing.assert_array_equal(np.asarray(ckpt.restore_params(1)['b']), [1.0, 2.0])
  shutil.rmtree(os.path.join(directory, '2', 'state', 'd'))  # the newest loses its arrays
  with caplog.at_level('WARNING'):
    step, state, _ = ckpt.restore_intact(_state(0.0))
  assert step == 1 and float(state['params']['w'][0, 0]) == 1.0
  assert 'checkpoints/2 is damaged' in caplog.text
  assert ckpt.all_steps() == [1] and os.listdir(directory + '_damaged') == ['2']
  with pytest.raises(UserError, match='restore_step=5 is not in'):
    ckpt.restore_intact(_state(0.0), step=5)
  with pytest.raises(UserError, match='other shapes than this'):
    ckpt.restore_intact({'params': {'w': jnp.zeros((4, 2)), 'b': jnp.zeros(2)}, 'step': jnp.asarray(0)})
  ckpt.close()
  found_dir, found_step, params = checkpoint.best_params(str(tmp_path))
  assert (found_dir, found_step) == (directory, 1)
  np.testing.assert_array_equal(np.asarray(params['w']), np.full((3, 2), 1.0))
  assert checkpoint.best_params(str(tmp_path / 'empty')) is None


def test_run_record_writes_the_config_and_the_environment(tmp_path):
  config = ml_collections.ConfigDict({'optimizer': {'learning_rate': 0.5}, 'seed': 3})
  run_record.record_config(config, str(tmp_path))
  with open(tmp_path / 'config.json') as f:
    assert json.load(f) == {'optimizer': {'learning_rate': 0.5}, 'seed': 3}
  assert '"learning_rate": 0.5' in run_record.config_text(config)
  env = run_record.environment()
  assert env['jax_version'] == jax.__version__ and env['device_count'] == jax.device_count()
  assert env['cpu_threads'] == len(os.sched_getaffinity(0)) or 'NPROC' in os.environ


def test_cpu_threads_is_nproc_where_set(monkeypatch):
  monkeypatch.setenv('NPROC', '3')
  assert run_record.cpu_threads() == 3
  monkeypatch.setenv('NPROC', 'many')  # not a number: the record falls back to the CPU count
  assert run_record.cpu_threads() == len(os.sched_getaffinity(0))
  monkeypatch.delenv('NPROC')
  assert run_record.cpu_threads() == len(os.sched_getaffinity(0))


def test_resume_with_another_cpu_pool_size_warns_and_the_checkpoint_records_it(tmp_path, monkeypatch, caplog):
  first, second = str(tmp_path / 'first'), str(tmp_path / 'second')
  monkeypatch.setenv('NPROC', '2')  # only recorded: this process's XLA pool is already made
  train.train_and_evaluate(strong_smoke({'num_epochs': 1}), first)
  ckpt = checkpoint.Checkpointer(os.path.join(first, 'checkpoints'), 3)
  assert ckpt.read_meta(ckpt.latest_step())['cpu_threads'] == 2
  ckpt.close()
  shutil.copytree(first, second)
  with caplog.at_level('WARNING'):
    train.train_and_evaluate(strong_smoke({'num_epochs': 2}), first)  # the same pool: no warning
  assert 'XLA:CPU thread pool' not in caplog.text
  monkeypatch.setenv('NPROC', '1')
  with caplog.at_level('WARNING'):
    train.train_and_evaluate(strong_smoke({'num_epochs': 2}), second)
  lines = [r.getMessage() for r in caplog.records if 'XLA:CPU thread pool' in r.getMessage()]
  assert lines == [
    'resuming with an XLA:CPU thread pool of 1 where the checkpoint was saved with 2: the floats from here on '
    'will not match an uninterrupted run bit for bit (NPROC=2 gives the saved size; docs/usage.md)'
  ]


def test_abandoned_orbax_reads_are_dropped_and_other_unraisable_errors_reported(monkeypatch):
  # After a damaged newest checkpoint, the resumed run's garbage collector closes orbax's unfinished read
  # coroutines, each reporting the read error (already logged as one warning) as a long "Exception ignored".
  reported = []
  monkeypatch.setattr(sys, 'excepthook', lambda *args: None)  # not wrapped yet: the hooks are installed afresh
  monkeypatch.setattr(sys, 'unraisablehook', reported.append)
  checkpoint._silence_closed_loop_noise()

  def coroutine_from(filename):
    namespace = {}
    exec(compile('async def read():\n  pass\n', filename, 'exec'), namespace)
    return namespace['read']()

  orbax_read = coroutine_from(os.path.join(os.sep, 'venv', 'site-packages', 'orbax', 'checkpoint', 'serialization.py'))
  other = coroutine_from(os.path.join(os.sep, 'venv', 'site-packages', 'other', 'reader.py'))
  for obj in (orbax_read, other):
    error = Exception('Encountered error while reading array index')
    sys.unraisablehook(
      types.SimpleNamespace(exc_type=Exception, exc_value=error, exc_traceback=None, err_msg=None, object=obj)
    )
    obj.close()
  assert [r.object for r in reported] == [other]
