"""TensorBoard writer, eval log and profiler window, read back with TensorBoard's own event reader."""

import glob
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_caption import plots
from cnn_caption.errors import UserError
from cnn_caption.training import metric_writers
from cnn_caption.training import monitor
from cnn_caption.training import profiling

event_accumulator = pytest.importorskip('tensorboard.backend.event_processing.event_accumulator')


def read_events(logdir: str):
  acc = event_accumulator.EventAccumulator(logdir, size_guidance={'scalars': 0, 'images': 0, 'tensors': 0})
  acc.Reload()
  return acc


def test_resume_continues_curves_without_duplicate_steps(tmp_path):
  logdir = str(tmp_path / 'tb')
  first = metric_writers.MetricWriter(logdir, start_step=0, enabled=True)
  for step in range(1, 11):
    first.write_scalars(step, {'train/loss': 1.0 / step})
  first.close()  # as if killed after step 10 with the last checkpoint at step 6
  second = metric_writers.MetricWriter(logdir, start_step=6, enabled=True)
  second.write_scalars(6, {'train/loss': 123.0})  # at or before the restored step: dropped
  for step in range(7, 13):
    second.write_scalars(step, {'train/loss': 2.0 / step})
  second.write_images(12, {'filters/conv1': np.random.default_rng(0).random((8, 8, 3))})
  second.close()
  assert len(glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))) == 2
  acc = read_events(logdir)
  events = acc.Scalars('train/loss')
  assert [e.step for e in events] == list(range(1, 13))
  values = {e.step: e.value for e in events}
  assert values[6] == pytest.approx(1 / 6) and values[7] == pytest.approx(2 / 7)
  assert [e.step for e in acc.Images('filters/conv1')] == [12]


def test_other_processes_write_nothing(tmp_path):
  writer = metric_writers.MetricWriter(str(tmp_path / 'tb'), enabled=False)
  writer.write_scalars(1, {'a': 1.0})
  writer.close()
  assert not os.path.exists(tmp_path / 'tb')


def test_image_shapes_are_checked(tmp_path):
  writer = metric_writers.MetricWriter(str(tmp_path / 'tb'), enabled=True)
  with pytest.raises(ValueError, match='HxWxC'):
    writer.write_images(1, {'bad': np.zeros((2, 3, 4, 5))})
  writer.close()


def test_eval_log_drops_rows_after_the_restored_step(tmp_path):
  path = str(tmp_path / 'eval.jsonl')
  log = metric_writers.EvalLog(path, enabled=True)
  for step in (5, 10, 15):
    log.append({'step': step, 'val_accuracy': step / 100})
  with open(path, 'a') as f:
    f.write('{"step": 20, "val_acc')  # a torn last line from a kill
  metric_writers.EvalLog(path, start_step=10, enabled=True).append({'step': 15, 'val_accuracy': 0.5})
  with open(path) as f:
    rows = [json.loads(line) for line in f]
  assert [(r['step'], r['val_accuracy']) for r in rows] == [(5, 0.05), (10, 0.1), (15, 0.5)]


def test_monitor_weights_the_loss_and_logs_per_step_metrics(tmp_path, monkeypatch):
  monkeypatch.setattr(metric_writers, 'is_main_process', lambda: True)
  from configs import classifier as classifier_config

  config = classifier_config.get_config('smoke')
  config.log_every_steps = 4
  mon = monitor.RunMonitor(
    config, str(tmp_path), start_step=0, total_steps=8, steps_per_epoch=8, learning_rate_fn=lambda step: 0.1 * step
  )
  # Two calls of two steps: nothing logged yet, then the interval [1, 4] is written at step 4.
  mon.train_metrics(
    0, {'loss': np.array([1.0, 3.0]), 'loss_weight': np.array([3.0, 1.0]), 'grad_norm': np.array([2.0, 4.0])}
  )
  mon.train_metrics(
    2, {'loss': np.array([2.0, 2.0]), 'loss_weight': np.array([1.0, 1.0]), 'grad_norm': np.array([6.0, 8.0])}
  )
  mon.evaluation(4, 0.5, {'val': {'accuracy': 0.25}, 'val_ema': {'accuracy': 0.5}})
  mon.close()
  acc = read_events(str(tmp_path / monitor.TENSORBOARD_DIR))
  scalar = lambda tag: [(e.step, e.value) for e in acc.Scalars(tag)]
  assert scalar('train/loss') == [(4, pytest.approx((3 + 3 + 2 + 2) / 6))]  # sum(loss * w) / sum(w)
  assert scalar('train/grad_norm') == [(4, pytest.approx(5.0))]
  assert scalar('train/learning_rate') == [(4, pytest.approx(0.4))]
  assert scalar('val_ema/accuracy') == [(4, 0.5)]
  assert {'train/steps_per_second', 'val/accuracy'} <= set(acc.Tags()['scalars'])
  assert acc.Tags()['tensors'] == ['config']
  assert acc.SummaryMetadata('config').plugin_data.plugin_name == 'text'
  text = acc.Tensors('config')[0].tensor_proto.string_val[0].decode()
  assert '"num_epochs": 2' in text
  with open(tmp_path / monitor.EVAL_LOG) as f:
    assert [json.loads(line) for line in f] == [
      {'step': 4, 'epoch': 0.5, 'val_accuracy': 0.25, 'val_ema_accuracy': 0.5}
    ]


@pytest.mark.parametrize('steps', [(3,), (4, 2), (-1, 2), (1.5, 3), 'ab'])
def test_bad_profile_steps_are_one_line_errors(steps):
  with pytest.raises(UserError, match='config.profile_steps'):
    profiling.check_profile_steps(steps)


@pytest.mark.parametrize('steps_per_call, window, first', [(1, (2, 4), 2), (8, (10, 15), 8)])
def test_profiler_traces_its_window(tmp_path, steps_per_call, window, first):
  # With 8 steps per call no call starts inside (10, 15): the trace starts with the call holding step 10.
  profiler = profiling.StepProfiler(window, str(tmp_path / 'profile'))
  fn = jax.jit(lambda x: x @ x)
  x = jnp.ones((8, 8))
  started_at = []
  for step in range(0, 24, steps_per_call):
    profiler.before_call(step, steps_per_call)
    if profiler.active and not started_at:
      started_at.append(step)
    x = fn(x) / 8
    profiler.after_call(step + steps_per_call, x)
  assert started_at == [first] and profiler.done and not profiler.active
  assert glob.glob(str(tmp_path / 'profile' / 'plugins' / 'profile' / '*' / '*.xplane.pb'))


def test_profile_window_outside_the_run_is_refused():
  profiling.check_window_in_run((), 8)
  profiling.check_window_in_run((7, 100), 8)  # starts in the run: traced to its end
  with pytest.raises(UserError, match=r'config.profile_steps=\(10, 15\) starts after the run ends \(steps 0..7\)'):
    profiling.check_window_in_run((10, 15), 8)


def test_rates_leave_out_paused_time_and_the_eta_covers_the_run(tmp_path, monkeypatch):
  monkeypatch.setattr(metric_writers, 'is_main_process', lambda: True)
  from configs import classifier as classifier_config

  now = [0.0]
  monkeypatch.setattr(monitor, 'time', types.SimpleNamespace(time=lambda: now[0]))
  lines = []
  monkeypatch.setattr(monitor.logging, 'info', lambda fmt, *args: lines.append(fmt % args))
  config = classifier_config.get_config('smoke')  # batch 8
  config.log_every_steps = 4
  mon = monitor.RunMonitor(config, str(tmp_path), start_step=0, total_steps=16, steps_per_epoch=8)
  now[0] = 2.0  # 4 steps in 2 s
  mon.train_metrics(0, {'loss': np.ones(4)})
  with mon.paused():  # an evaluation and a checkpoint: 10 s
    now[0] += 10.0
  now[0] += 2.0  # 4 more steps in 2 s of training
  mon.train_metrics(4, {'loss': np.ones(4)})
  mon.close()
  scalars = read_events(str(tmp_path / monitor.TENSORBOARD_DIR)).Scalars('train/examples_per_second')
  assert [(e.step, e.value) for e in scalars] == [(4, 16.0), (8, 16.0)]
  progress = [line for line in lines if line.startswith('epoch ')]
  # ETA: the remaining steps at this start's pace so far, pauses included: 12 * 2 / 4 s, then 8 * 14 / 8 s.
  assert progress[0].endswith('2.0 steps/s  16 examples/s  ETA 6s'), progress
  assert progress[1].endswith('2.0 steps/s  16 examples/s  ETA 14s'), progress


def test_format_duration():
  assert [monitor.format_duration(s) for s in (0.4, 59, 61, 3599, 3600, 7500)] == [
    '0s',
    '59s',
    '1m01s',
    '59m59s',
    '1h00m',
    '2h05m',
  ]


def test_filter_image_is_rgb_mosaic():
  kernel = np.zeros((3, 3, 1, 16), np.float32)
  kernel[0, 0, 0, 0] = 1.0
  image = plots.filter_image(kernel, scale=1)
  assert image.shape == (2 * 4, 8 * 4, 3) and image.dtype == np.uint8
  assert tuple(image[0, 0]) != tuple(image[0, 1])  # the one positive weight stands out
