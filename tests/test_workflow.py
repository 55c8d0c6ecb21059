"""The research workflow around training: TensorBoard, eval cadence, EMA, profiler, the run's record.

One classifier run (trained for one epoch, then resumed for a second) and one attention-captioner run
are shared by the tests of this module.
"""

import glob
import json
import os

import pytest

from cnn_caption import config_utils
from cnn_caption import train
from cnn_caption.errors import UserError
from configs import captioner_attention as captioner_attention_config
from configs import classifier as classifier_config
from conftest import needs_fmnist
from conftest import override
from conftest import read_jsonl

event_accumulator = pytest.importorskip('tensorboard.backend.event_processing.event_accumulator')


def read_events(workdir):
  acc = event_accumulator.EventAccumulator(
    os.path.join(str(workdir), 'tensorboard'), size_guidance={'scalars': 0, 'images': 0, 'tensors': 0}
  )
  acc.Reload()
  return acc


def steps_of(acc, tag):
  return [e.step for e in acc.Scalars(tag)]


def classifier_config_for_test(num_epochs):
  config = classifier_config.get_config('smoke')
  return override(
    config,
    **{
      'data.num_train': 160,
      'data.num_eval': 100,
      'num_epochs': num_epochs,
      'steps_per_call': 2,
      'log_every_steps': 5,
      'eval_every_steps': 10,
      'ema_decay': 0.9,
      'test_params': 'ema',
      'profile_steps': (2, 4),
      'log_grad_norm': True,
    },
  )


@pytest.fixture(scope='module')
def classifier_run(tmp_path_factory):
  """20 steps per epoch: one epoch, then the same workdir resumed for a second."""
  workdir = tmp_path_factory.mktemp('classifier')
  first = train.train_and_evaluate(classifier_config_for_test(1), str(workdir))
  results = train.train_and_evaluate(classifier_config_for_test(2), str(workdir))
  return workdir, first, results


@pytest.mark.slow
@needs_fmnist
def test_tensorboard_curves_continue_after_resume(classifier_run):
  workdir, _, _ = classifier_run
  assert len(glob.glob(str(workdir / 'tensorboard' / 'events.out.tfevents.*'))) == 2  # one per start
  acc = read_events(workdir)
  for tag in ('train/loss', 'train/grad_norm', 'train/learning_rate', 'train/steps_per_second'):
    assert steps_of(acc, tag) == [6, 10, 16, 20, 26, 30, 36, 40], tag  # calls of 2 steps, logged every 5
  assert [e.value for e in acc.Scalars('train/learning_rate')] == [pytest.approx(0.01)] * 8
  # validation every 10 steps and at both epoch ends (20, 40), each step once
  assert steps_of(acc, 'val/accuracy') == [10, 20, 30, 40]
  assert steps_of(acc, 'val_ema/accuracy') == [10, 20, 30, 40]
  assert steps_of(acc, 'val/loss') == [10, 20, 30, 40]
  for layer in ('conv1', 'conv2'):
    images = acc.Images(f'filters/{layer}')
    assert [e.step for e in images] == [20, 40] and images[0].width > 0
  texts = acc.Tensors('config')
  assert [e.step for e in texts] == [0, 20]  # the config of each start
  assert '"eval_every_steps": 10' in texts[0].tensor_proto.string_val[0].decode()


@pytest.mark.slow
@needs_fmnist
def test_eval_log_and_metrics_rows(classifier_run):
  workdir, _, results = classifier_run
  evals = read_jsonl(workdir / 'eval.jsonl')
  assert [r['step'] for r in evals] == [10, 20, 30, 40]
  assert [r['epoch'] for r in evals] == [0.5, 1.0, 1.5, 2.0]
  assert all({'val_accuracy', 'val_ema_accuracy', 'val_loss'} <= set(r) for r in evals)
  history = read_jsonl(workdir / 'metrics.jsonl')
  assert [r['epoch'] for r in history] == [1, 2]  # still one row per epoch
  assert history[1]['val_ema_accuracy'] == evals[3]['val_ema_accuracy']
  # test_params='ema': the best epoch is chosen by the EMA's validation accuracy
  assert results['best_val_accuracy'] == max(r['val_ema_accuracy'] for r in history)
  assert results['test_params'] == 'ema'


@pytest.mark.slow
@needs_fmnist
def test_run_record(classifier_run):
  workdir, first, results = classifier_run
  with open(workdir / 'config.json') as f:
    assert json.load(f)['ema_decay'] == 0.9
  env = results['environment']
  assert env['jax_version'] and env['device_count'] >= 1 and env['cnn_caption_version']
  assert env['git_commit'] is None or len(env['git_commit'].split('+')[0]) == 40
  assert first['epochs_trained'] == 1 and results['epochs_trained'] == 2


@pytest.mark.slow
@needs_fmnist
def test_profiler_trace_of_two_steps(classifier_run):
  workdir, _, _ = classifier_run
  traces = glob.glob(str(workdir / 'profile' / 'plugins' / 'profile' / '*' / '*.xplane.pb'))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0  # steps 2..3 of the first start only


@pytest.mark.parametrize(
  'field, value',
  [
    ('ema_decay', 1.0),
    ('eval_every_steps', -1),
    ('test_params', 'best'),
    ('profile_steps', (5, 1)),
    ('optimizer.accumulate_steps', 0),
  ],
)
def test_bad_workflow_fields_are_one_line_errors(field, value):
  config = override(classifier_config.get_config('smoke'), **{field: value})
  with pytest.raises(UserError, match=field.replace('.', r'\.')):
    config_utils.validate(config)


def test_ema_test_params_need_an_ema():
  config = override(classifier_config.get_config('smoke'), test_params='ema')
  with pytest.raises(UserError, match='ema_decay'):
    config_utils.validate(config)


@pytest.fixture(scope='module')
def captioner_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('captioner')
  config = override(captioner_attention_config.get_config('smoke'), num_epochs=1, log_every_steps=1)
  return workdir, train.train_and_evaluate(config, str(workdir))


@pytest.mark.slow
def test_captioner_attention_images_and_token_weighted_loss(captioner_run):
  workdir, results = captioner_run
  acc = read_events(workdir)
  attention = [tag for tag in acc.Tags()['images'] if tag.startswith('attention/')]
  assert len(attention) == 3
  assert acc.Images(attention[0])[0].width > 100
  assert {'train/loss', 'train/grad_norm', 'train/num_tokens'} <= set(acc.Tags()['scalars'])
  assert os.path.exists(workdir / 'config.json') and results['environment']['jax_version']
  # log_every_steps=1: each TensorBoard point is one step's loss and token count; the epoch loss in
  # metrics.jsonl weights them by tokens (a mean of batch means would differ).
  losses = [e.value for e in acc.Scalars('train/loss')]
  tokens = [e.value for e in acc.Scalars('train/num_tokens')]
  weighted = sum(loss * n for loss, n in zip(losses, tokens)) / sum(tokens)
  history = read_jsonl(workdir / 'metrics.jsonl')
  assert history[0]['train_loss'] == pytest.approx(weighted, rel=1e-5)
  assert len(set(tokens)) > 1 and history[0]['train_loss'] != pytest.approx(sum(losses) / len(losses), rel=1e-6)
