"""The generic training loop: end to end, resume == uninterrupted, sharding, NaN stop, config errors."""

import functools
import importlib
import json
import os
import pathlib
import shutil

import jax
import numpy as np
import optax
import pytest

from cnn_caption import models
from cnn_caption import sweep
from cnn_caption import train
from cnn_caption.errors import UserError
from configs import classifier as classifier_config
from conftest import final_params
from conftest import kill_after_checkpoint
from conftest import needs_fmnist
from conftest import override
from conftest import read_jsonl
from conftest import run_launch
from conftest import strip_timing
from conftest import train_step_hlo

pytestmark = needs_fmnist


def smoke_config(**overrides):
  config = classifier_config.get_config('smoke')
  config.data.num_train = 160
  config.data.num_eval = 100
  return override(config, **overrides)


def assert_same_params(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


SMOKE = ['--config=configs/classifier.py:smoke', '--config.checkpoint.every_steps=16']


@pytest.fixture(scope='module')
def smoke_launch(tmp_path_factory):
  """README's smoke run (400 images, 50 steps an epoch, a checkpoint every 16 steps) launched once, uninterrupted."""
  workdir = tmp_path_factory.mktemp('smoke_launch')
  result = run_launch(*SMOKE, f'--workdir={workdir}')
  return workdir, result


@pytest.fixture(scope='module')
def smoke_160(tmp_path_factory):
  """smoke_config() trained in this process: 2 epochs of 20 steps, uninterrupted."""
  workdir = str(tmp_path_factory.mktemp('smoke_160'))
  train.train_and_evaluate(smoke_config(), workdir)
  return workdir


@pytest.fixture(scope='module')
def smoke_160_one_epoch(tmp_path_factory):
  """The first epoch of smoke_160 alone (tests copy it before changing it)."""
  workdir = str(tmp_path_factory.mktemp('smoke_160_one_epoch'))
  train.train_and_evaluate(smoke_config(num_epochs=1), workdir)
  return workdir


@pytest.mark.slow
def test_smoke_run_writes_every_file(smoke_launch, tmp_path):
  workdir, result = smoke_launch
  shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)  # the second start below must not touch the fixture
  assert result.returncode == 0, result.stderr[-2000:]
  for name in (
    'metrics.jsonl',
    'results.json',
    'plots/train_loss.png',
    'plots/val_accuracy.png',
    'plots/filters_conv1.png',
    'plots/filters_conv2.png',
  ):
    assert os.path.getsize(tmp_path / name) > 0, name
  assert os.listdir(tmp_path / 'checkpoints')
  history = read_jsonl(tmp_path / 'metrics.jsonl')
  assert [r['epoch'] for r in history] == [1, 2]
  for r in history:
    assert {'epoch', 'train_loss', 'train_loss_running', 'val_accuracy', 'seconds'} <= set(r)
  # running mean over all batches of both epochs = mean of the two epoch means (equal batch counts)
  assert history[1]['train_loss_running'] == pytest.approx((history[0]['train_loss'] + history[1]['train_loss']) / 2)
  results = json.loads((tmp_path / 'results.json').read_text())
  assert results['num_params'] == 769_930
  assert {'test_accuracy', 'val_accuracy', 'best_epoch', 'best_val_accuracy', 'config'} <= set(results)
  assert results['config']['optimizer']['learning_rate'] == 0.01
  assert 'no checkpoint, starting fresh' in result.stderr
  # a second start with the same command resumes and changes nothing
  again = run_launch(*SMOKE, f'--workdir={tmp_path}')
  assert again.returncode == 0 and 'resuming from step 100' in again.stderr
  assert strip_timing(read_jsonl(tmp_path / 'metrics.jsonl')) == strip_timing(history)


@pytest.mark.slow
def test_resume_equals_uninterrupted(smoke_160, smoke_160_one_epoch, tmp_path):
  part = str(tmp_path / 'part')
  shutil.copytree(smoke_160_one_epoch, part)
  assert len(read_jsonl(os.path.join(part, 'metrics.jsonl'))) == 1
  train.train_and_evaluate(smoke_config(), part)  # same command, more epochs: resumes at epoch 2
  step_a, params_a = final_params(smoke_160)
  step_b, params_b = final_params(part)
  assert step_a == step_b == 40
  assert_same_params(params_a, params_b)
  assert strip_timing(read_jsonl(os.path.join(smoke_160, 'metrics.jsonl'))) == strip_timing(
    read_jsonl(os.path.join(part, 'metrics.jsonl'))
  )


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(smoke_launch, tmp_path):
  killed, (clean, _) = str(tmp_path / 'killed'), smoke_launch
  steps = kill_after_checkpoint(SMOKE, killed, min_step=32)
  assert steps[-1] < 100, f'kill came too late to test anything: {steps}'
  resumed = run_launch(*SMOKE, f'--workdir={killed}')
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f'resuming from step {steps[-1]}' in resumed.stderr
  assert_same_params(final_params(killed)[1], final_params(str(clean))[1])
  assert strip_timing(read_jsonl(os.path.join(killed, 'metrics.jsonl'))) == strip_timing(
    read_jsonl(os.path.join(clean, 'metrics.jsonl'))
  )


@pytest.mark.slow
def test_two_devices_match_one_device(smoke_160, tmp_path):
  args = ['--config=configs/classifier.py:smoke', '--config.data.num_train=160', '--config.data.num_eval=100']
  two = run_launch(*args, f'--workdir={tmp_path / "two"}', devices=2)
  assert two.returncode == 0, two.stderr[-2000:]
  one = pathlib.Path(smoke_160)  # smoke_config(), the same run on this process's one device
  r1 = json.loads((one / 'results.json').read_text())
  r2 = json.loads((tmp_path / 'two' / 'results.json').read_text())
  assert (r1['devices'], r2['devices']) == (1, 2)
  for a, b in zip(read_jsonl(one / 'metrics.jsonl'), read_jsonl(tmp_path / 'two' / 'metrics.jsonl'), strict=True):
    # Two devices sum each gradient in two halves: the same model up to rounding, which 40 SGD steps grow to
    # about 1.5e-4 of the loss with the default layers (the original program stays within 1e-4).
    assert a['train_loss'] == pytest.approx(b['train_loss'], rel=5e-4)
    assert a['val_accuracy'] == pytest.approx(b['val_accuracy'], abs=0.011)
  assert r1['test_accuracy'] == pytest.approx(r2['test_accuracy'], abs=0.011)


@pytest.mark.slow
def test_batch_size_not_divisible_by_devices(tmp_path):
  result = run_launch(
    '--config=configs/classifier.py:smoke', '--config.batch_size=3', f'--workdir={tmp_path}', devices=2
  )
  assert result.returncode == 2
  assert 'config.batch_size=3 is not divisible by the 2 devices' in result.stderr
  assert 'Traceback' not in result.stderr


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(smoke_160_one_epoch, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(smoke_160_one_epoch, workdir)
  step, params = final_params(workdir)
  metrics_before = (tmp_path / 'run' / 'metrics.jsonl').read_text()
  with pytest.raises(UserError, match='loss became .* at step'):
    # Resuming with another learning rate is a config change: allowed on purpose here.
    train.train_and_evaluate(
      smoke_config(**{'num_epochs': 2, 'optimizer.learning_rate': 1e30, 'checkpoint.allow_config_change': True}),
      workdir,
    )
  step_after, params_after = final_params(workdir)
  assert step_after == step
  assert_same_params(params, params_after)
  assert (tmp_path / 'run' / 'metrics.jsonl').read_text() == metrics_before


@pytest.mark.slow
def test_sweep_smoke_picks_by_validation_and_members_equal_runs_alone(tmp_path):
  args = ['--config.data.num_eval=50', '--config.eval_batch_size=50', '--config.num_epochs=1']
  rates = '--config.sweep.learning_rates=(0.01,0.1)'  # two of the variant's three: a choice, at less cost
  result = run_launch('--config=configs/classifier.py:smoke_sweep', *args, rates, f'--workdir={tmp_path / "sweep"}')
  assert result.returncode == 0, result.stderr[-2000:]
  results = json.loads((tmp_path / 'sweep' / 'results.json').read_text())
  assert [r['learning_rate'] for r in results['runs']] == [0.01, 0.1]
  assert results['best']['val_accuracy'] == max(r['val_accuracy'] for r in results['runs'])
  assert os.path.exists(tmp_path / 'sweep' / 'plots' / 'val_accuracy.png')
  alone = run_launch(
    '--config=configs/classifier.py:smoke',
    *args,
    '--config.optimizer.learning_rate=0.1',
    f'--workdir={tmp_path / "alone"}',
  )
  assert alone.returncode == 0, alone.stderr[-2000:]
  assert strip_timing(read_jsonl(tmp_path / 'alone' / 'metrics.jsonl')) == strip_timing(
    read_jsonl(tmp_path / 'sweep' / 'lr_0.1' / 'metrics.jsonl')
  )
  member = json.loads((tmp_path / 'sweep' / 'lr_0.1' / 'results.json').read_text())
  assert member['test_accuracy'] == json.loads((tmp_path / 'alone' / 'results.json').read_text())['test_accuracy']


def test_early_stopping_rule_also_holds_on_resume():
  import types

  fake = types.SimpleNamespace(config=smoke_config(early_stopping_patience=2))
  history = lambda n: [{'epoch': i + 1} for i in range(n)]
  meta = lambda n, best: train.RunMeta(history=history(n), best_epoch=best)
  assert not train.Trainer._should_stop(fake, meta(0, None))
  assert not train.Trainer._should_stop(fake, meta(5, 4))
  assert train.Trainer._should_stop(fake, meta(6, 4))
  fake.config.early_stopping_patience = 0  # off
  assert not train.Trainer._should_stop(fake, meta(9, 1))


@pytest.mark.slow
def test_kill_between_best_and_epoch_checkpoint_resumes(smoke_160, tmp_path):
  """Simulates a kill after the best-epoch save but before the epoch save: resume must not crash."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(smoke_160, workdir)
  step, params = final_params(workdir)
  # The collision needs the last epoch to be the best one (true for this seed and config).
  assert json.loads((tmp_path / 'run' / 'results.json').read_text())['best_epoch'] == 2
  assert os.listdir(os.path.join(workdir, 'checkpoints_best')) == [str(step)]
  shutil.rmtree(os.path.join(workdir, 'checkpoints', str(step)))  # epoch 2 saved as best only
  train.train_and_evaluate(smoke_config(), workdir)
  step_again, params_again = final_params(workdir)
  assert step_again == step
  assert_same_params(params, params_again)


def _trainer_of(config, workdir, num_train):
  """A Trainer over a stand-in task: __init__ needs only the number of training examples."""
  import types

  return train.Trainer(config, workdir, types.SimpleNamespace(num_train=num_train), None)


def test_profile_window_after_the_last_step_is_refused_at_start(tmp_path):
  config = smoke_config(profile_steps=(40, 45))  # 160 examples at batch 8, 2 epochs: steps 0..39
  with pytest.raises(UserError, match=r'config.profile_steps=\(40, 45\) starts after the run ends'):
    _trainer_of(config, str(tmp_path), 160)
  assert os.listdir(tmp_path) == []
  _trainer_of(smoke_config(profile_steps=(35, 40)), str(tmp_path / 'ok'), 160)


def test_eval_cadence_off_call_boundaries_is_logged_once(tmp_path, monkeypatch):
  lines = []
  monkeypatch.setattr(train.logging, 'info', lambda fmt, *args: lines.append(fmt % args))
  cadence = lambda: [line for line in lines if line.startswith('config.eval_every_steps')]
  # 20 steps an epoch in calls of 8 (8, 16, 20): validation after 16 (passes 10) and 36 (passes 30), not at 10 / 30.
  _trainer_of(smoke_config(eval_every_steps=10, steps_per_call=8), str(tmp_path / 'a'), 160)
  assert cadence() == [
    'config.eval_every_steps=10: validation runs at the end of the call (config.steps_per_call=8) that passes '
    'each multiple of 10, after steps 16, 36, and at every epoch end'
  ]
  lines.clear()
  _trainer_of(smoke_config(eval_every_steps=8, steps_per_call=4), str(tmp_path / 'b'), 160)
  assert cadence() == []  # every multiple of 8 ends a call


def test_finished_sweep_only_summarises_and_picks_by_validation(tmp_path):
  config = classifier_config.get_config('smoke_sweep')  # rates 0.001, 0.01, 0.1
  val = {0.001: 0.5, 0.01: 0.8, 0.1: 0.7}
  for lr, accuracy in val.items():
    member = sweep.run_dir(str(tmp_path), lr)
    os.makedirs(member)
    record = {'val_accuracy': accuracy, 'test_accuracy': 1 - accuracy, 'best_val_accuracy': accuracy}
    (tmp_path / member / 'results.json').write_text(json.dumps({**record, 'train_loss': 1.0, 'train_seconds': 2.0}))
    (tmp_path / member / 'metrics.jsonl').write_text(json.dumps({'train_loss': 1.0, 'val_accuracy': accuracy}) + '\n')
  results = sweep.run_sweep(config, str(tmp_path))  # every member has its results.json: nothing is trained
  assert results['best']['learning_rate'] == 0.01 and results['best']['test_accuracy'] == pytest.approx(0.2)
  assert [r['learning_rate'] for r in results['runs']] == [0.001, 0.01, 0.1]
  assert os.path.getsize(tmp_path / 'plots' / 'val_accuracy.png') > 0
  member = sweep.single_run_config(config, 0.1)
  assert member.optimizer.learning_rate == 0.1 and member.sweep.learning_rates == ()
  config.sweep.learning_rates = (0.1, 0.1)
  with pytest.raises(UserError, match='has duplicates'):
    sweep.run_sweep(config, str(tmp_path / 'dup'))


def test_xla_options_reach_the_train_step(tmp_path):
  """config.xla_options compiles the train step with those XLA options (here: YNNPACK fusions off)."""
  default = train_step_hlo(smoke_config(xla_options=''), str(tmp_path / 'a'))
  if 'ynn_fusion' not in default:
    pytest.skip('XLA:CPU uses no YNNPACK fusion for this step on this machine')
  assert 'ynn_fusion' not in train_step_hlo(
    smoke_config(xla_options='xla_cpu_experimental_ynn_fusion_type='), str(tmp_path / 'b')
  )


def test_eval_xla_options_reach_evaluation_not_the_train_step(tmp_path):
  """config.eval_xla_options compiles evaluation with those options, and its accuracy and loss stay the same."""
  from cnn_caption.tasks import classification
  from cnn_caption.training import parallel

  def eval_hlo(eval_xla_options):
    config = smoke_config(eval_xla_options=eval_xla_options)
    task = classification.ClassificationTask(config, str(tmp_path), parallel.make_mesh())
    params = task.model.init(jax.random.key(0), *task.example_inputs())['params']
    batch = {'image': np.zeros((100, 28, 28, 1), np.float32), 'label': np.zeros((100,), np.int32)}
    batch['mask'] = np.ones((100,), bool)
    args = (task._variables(params), parallel.shard_batch(batch, task.mesh))
    text = task._eval_fn._jitted.lower(*args).compile().as_text()
    return text, task.evaluate(params, 'val')

  default, metrics_default = eval_hlo('')
  if 'ynn_fusion' not in default:
    pytest.skip('XLA:CPU uses no YNNPACK fusion for evaluation on this machine')
  off, metrics_off = eval_hlo('xla_cpu_experimental_ynn_fusion_type=')
  assert 'ynn_fusion' not in off
  assert metrics_off['accuracy'] == metrics_default['accuracy']
  assert metrics_off['loss'] == pytest.approx(metrics_default['loss'], rel=1e-5)


@pytest.mark.parametrize('config_name', ['classifier', 'captioner_attention'])
def test_initialiser_compiled_at_level_1_gives_the_parameters_of_the_default_compilation(config_name):
  config = importlib.import_module(f'configs.{config_name}').get_config(None)
  model = models.create_model(config, **models.shape_only_fields(config))
  inputs = models.example_inputs(config)
  rng = jax.random.key(3)
  state = train.create_train_state(model, inputs, rng, optax.sgd(0.1))
  default = jax.jit(functools.partial(model.init, train=False))(rng, *inputs)['params']
  assert_same_params(state.params, default)
  assert sum(x.size for x in jax.tree.leaves(default)) > 500_000  # the real network, not a toy
