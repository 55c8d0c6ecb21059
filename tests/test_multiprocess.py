"""Several processes on localhost (jax.distributed over gloo): equal to one process, failures, signals, topology.

Every run is a real `launch.py` subprocess; runs are shared between tests through module fixtures. The
reference for every 2-way run is one process with 2 devices: 2 processes x 1 device give bit-identical
parameters and metrics (same global batch, same reduction order over the 2 devices).
"""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from conftest import final_params
from conftest import has_fashion_mnist
from conftest import needs_fmnist
from conftest import read_jsonl
from conftest import ROOT
from conftest import strip_timing

pytestmark = pytest.mark.slow

# 800 examples at batch 8, one step a call: 100 calls an epoch, long enough (a second or more) that a signal lands
# mid-epoch.
CLASSIFIER = [
  '--config=configs/classifier.py:smoke',
  '--config.data.num_train=800',
  '--config.data.num_eval=100',
  '--config.steps_per_call=1',
  '--config.checkpoint.every_steps=40',
  '--config.log_every_steps=50',
]
ATTENTION = [
  '--config=configs/captioner_attention.py:smoke',
  '--config.data.synthetic_num_images=16',
  '--config.num_epochs=1',
  '--config.eval_batch_size=8',
]
DEADLINE_S = 900  # a hang guard only: on a loaded 2-core machine one run can take minutes
# XLA:CPU's float results depend on the size of its intra-op thread pool (NPROC, else the CPUs a process sees;
# docs/usage.md): every run here gets a pool of 2, so the layouts compare bit for bit on any machine, one CPU
# (`taskset -c 0 pytest`) included.
XLA_CPU_THREADS = '2'


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


_STARTED: list['Run'] = []


@pytest.fixture(scope='module', autouse=True)
def kill_leftovers():
  """A failed test may leave processes running (they ignore SIGTERM once distributed): SIGKILL them."""
  yield
  for r in _STARTED:
    r.kill()


class Run:
  """N launch.py processes of one run (N=1: a plain single-process run); logs go to files."""

  def __init__(
    self,
    args,
    workdir,
    num_processes=1,
    devices=1,
    log_dir=None,
    workdirs=None,
    extra=None,
    port=None,
    limit_s=None,
    cwds=None,
  ):
    """Starts the processes; extra[i] holds more arguments for process i, cwds[i] its working folder.

    limit_s wraps each in `timeout -k` (not for runs a test signals: timeout forwards the signals it receives).
    """
    self.log_dir = str(log_dir or workdir) + '_logs'
    os.makedirs(self.log_dir, exist_ok=True)
    env = dict(
      os.environ,
      JAX_PLATFORMS='cpu',
      XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}' if devices > 1 else '',
      NPROC=XLA_CPU_THREADS,
    )
    port = port or free_port()
    self.limit_s = limit_s
    self.procs, self.logs, self.spies = [], [], []
    self.start = time.time()
    _STARTED.append(self)
    for i in range(num_processes):
      spy = os.path.join(self.log_dir, f'writes_{i}.txt')
      cmd = [
        sys.executable,
        os.path.join(ROOT, 'tests', 'write_spy.py'),
        spy,
        os.path.join(ROOT, 'launch.py'),
        *args,
        f'--workdir={workdirs[i] if workdirs else workdir}',
      ]
      if num_processes > 1:
        cmd += [f'--coordinator_address=localhost:{port}', f'--num_processes={num_processes}']
        cmd += [] if any(a.startswith('--process_id') for a in (extra or {}).get(i, [])) else [f'--process_id={i}']
      cmd += (extra or {}).get(i, [])
      if limit_s:
        cmd = ['timeout', '-k', '10', str(limit_s), *cmd]
      log = os.path.join(self.log_dir, f'process_{i}.log')
      with open(log, 'w') as f:
        self.procs.append(
          subprocess.Popen(cmd, cwd=cwds[i] if cwds else ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        )
      self.logs.append(log)
      self.spies.append(spy)

  def wait(self, timeout=DEADLINE_S) -> list[int]:
    """Exit codes; kills every process still alive after `timeout` seconds and fails."""
    deadline = self.start + timeout
    codes = []
    try:
      for p in self.procs:
        codes.append(p.wait(timeout=max(deadline - time.time(), 0.1)))
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f'processes still running after {timeout} s; logs in {self.log_dir}')
    return codes

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        if self.limit_s:
          os.killpg(p.pid, signal.SIGKILL)  # `timeout` leads its own process group: it and its child
        else:
          p.kill()
        p.wait()

  def output(self, i: int) -> str:
    with open(self.logs[i]) as f:
      return f.read()

  def writes(self, i: int) -> list[str]:
    if not os.path.exists(self.spies[i]):
      return []
    with open(self.spies[i]) as f:
      return f.read().split()


def run(args, workdir, **kwargs) -> Run:
  r = Run(args, workdir, **kwargs)
  codes = r.wait()
  assert codes == [0] * len(codes), f'exit codes {codes}:\n' + r.output(0)[-3000:]
  return r


def wait_for_checkpoint(workdir, min_step: int, procs, timeout=600) -> int:
  directory = os.path.join(workdir, 'checkpoints')
  deadline = time.time() + timeout
  while time.time() < deadline:
    steps = [int(d) for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(directory) else []
    if steps and max(steps) >= min_step:
      return max(steps)
    assert all(p.poll() is None for p in procs), 'a process ended before the checkpoint'
    time.sleep(0.05)
  pytest.fail(f'no checkpoint >= {min_step} in {directory} after {timeout} s')


def results(workdir) -> dict:
  with open(os.path.join(workdir, 'results.json')) as f:
    out = json.load(f)
  # environment names the process count (and the git state), which differs between the layouts compared.
  return {k: v for k, v in out.items() if 'seconds' not in k and k != 'environment'}


def assert_same_run(a, b) -> None:
  """Parameters, metrics history and results of two workdirs are identical (timings aside)."""
  step_a, params_a = final_params(a)
  step_b, params_b = final_params(b)
  assert step_a == step_b
  leaves_a, leaves_b = jax.tree.leaves(params_a), jax.tree.leaves(params_b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert strip_timing(read_jsonl(os.path.join(a, 'metrics.jsonl'))) == strip_timing(
    read_jsonl(os.path.join(b, 'metrics.jsonl'))
  )
  assert results(a) == results(b)


@pytest.fixture(scope='module')
def runs_dir():
  """A folder of our own: other pytest sessions on this machine prune pytest's shared tmp folders."""
  path = tempfile.mkdtemp(prefix='cnn_caption_mp_')
  yield pathlib.Path(path)
  shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope='module')
def classifier_reference(runs_dir):
  """1 process x 2 devices, uninterrupted: what every 2-way classifier run must equal."""
  if not has_fashion_mnist():
    pytest.skip('Fashion-MNIST not installed')
  workdir = str(runs_dir / 'cls_reference')
  run(CLASSIFIER, workdir, devices=2)
  return workdir


@needs_fmnist
def test_two_processes_equal_one_process_two_devices_and_only_process_0_writes(classifier_reference, runs_dir):
  workdir = str(runs_dir / 'cls_2x1')
  r = run(CLASSIFIER, workdir, num_processes=2)
  assert_same_run(workdir, classifier_reference)
  assert results(workdir)['devices'] == 2
  # Process 0 wrote the files; process 1 wrote nothing in the workdir but its checkpoint shards.
  written_0 = [p for p in r.writes(0) if p.startswith(workdir)]
  assert any(p.endswith('results.json') for p in written_0)
  assert any(p.endswith('metrics.jsonl') for p in written_0)
  written_1 = [p for p in r.writes(1) if p.startswith(workdir) and '/checkpoints' not in p]
  assert written_1 == []
  # Process 1 logs warnings only.
  assert ' epoch 1: ' in r.output(0)
  assert not [line for line in r.output(1).splitlines() if line.startswith('I')]


def test_two_processes_equal_one_process_for_the_attention_captioner(runs_dir):
  one, two = str(runs_dir / 'att_1x2'), str(runs_dir / 'att_2x1')
  args = ATTENTION + [f'--config.data.synthetic_dir={runs_dir / "synthetic"}']  # same images: same cache keys
  run(args, one, devices=2)
  r = run(args, two, num_processes=2)
  assert_same_run(one, two)
  # The feature cache was split over the processes and ends identical to the one-process cache.
  (folder_one,), (folder_two,) = [
    [os.path.join(w, 'features', d) for d in os.listdir(os.path.join(w, 'features'))] for w in (one, two)
  ]
  names = sorted(os.listdir(folder_one))
  entries = [n for n in names if n.endswith('.npy') and not n.startswith('store-')]
  assert sorted(os.listdir(folder_two)) == names and len(entries) == 16
  for name in names:
    if name.endswith('.npy'):
      np.testing.assert_array_equal(np.load(os.path.join(folder_two, name)), np.load(os.path.join(folder_one, name)))
  npy_0 = {p for p in r.writes(0) if p.endswith('.npy')}
  npy_1 = {p for p in r.writes(1) if p.endswith('.npy')}
  assert npy_0 and npy_1 and not npy_0 & npy_1  # each process encoded its own share
  for name in (
    'test_captions.json',
    'test_attention.npz',
    'report.html',
    'vocab.json',
    'config.json',
    'results.json',
    'key.json',
    '.png',
  ):
    assert not [p for p in r.writes(1) if p.endswith(name)]
  assert os.path.exists(os.path.join(two, 'test_captions.json'))


@needs_fmnist
def test_two_processes_with_two_devices_each(runs_dir):
  workdir = str(runs_dir / 'cls_2x2')
  args = [a for a in CLASSIFIER if 'num_train' not in a] + ['--config.data.num_train=160']
  r = run(args, workdir, num_processes=2, devices=2)
  assert results(workdir)['devices'] == 4
  assert 'resuming' not in r.output(0)
  assert all(np.isfinite(rec['train_loss']) for rec in read_jsonl(os.path.join(workdir, 'metrics.jsonl')))


@needs_fmnist
def test_workdir_not_shared_stops_every_process_within_30s(runs_dir):
  # One --workdir for both (as every process gets the same command), which each resolves in its own folder:
  # the same path on two machines' own disks.
  hosts = [runs_dir / 'host_a', runs_dir / 'host_b']
  for host in hosts:
    host.mkdir()
  args = [a.replace('configs/', f'{ROOT}/configs/') for a in CLASSIFIER]
  r = Run(args, str(runs_dir / 'unshared'), num_processes=2, workdirs=['run', 'run'], cwds=hosts)
  codes = r.wait(timeout=DEADLINE_S)
  ended = time.time()
  assert codes == [2, 2]
  # Within 30 s of process 0 starting to join (its first log line; interpreter start-up is not counted).
  joined = re.search(r'^I\d{4} (\d\d):(\d\d):(\d\d)\.\d+ .*Connecting to JAX distributed', r.output(0), re.M)
  h, m, sec = map(int, joined.groups())
  now = time.gmtime(ended)
  assert (now.tm_hour * 3600 + now.tm_min * 60 + now.tm_sec - (h * 3600 + m * 60 + sec)) % 86400 < 30
  for i in range(2):
    errors = [line for line in r.output(i).splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'is not shared' in errors[0], r.output(i)[-2000:]
    assert 'Traceback' not in r.output(i)


def _signal_then_resume(
  args, workdir, signum, expected_code, num_processes=1, devices=1, min_step=40, target=0
) -> tuple[Run, int]:
  """Starts a run, sends signum to process `target` after a checkpoint at >= min_step, waits; returns the stop step."""
  r = Run(args, workdir, num_processes=num_processes, devices=devices)
  wait_for_checkpoint(workdir, min_step, r.procs)
  r.procs[target].send_signal(signum)
  codes = r.wait(timeout=DEADLINE_S)
  assert codes == [expected_code] * num_processes, r.output(0)[-3000:]
  lines = [line for line in r.output(0).splitlines() if 'preempted at step' in line or 'interrupted at step' in line]
  assert len(lines) == 1, r.output(0)[-3000:]
  assert 'Traceback' not in r.output(0)
  step = int(lines[0].split(' at step ')[1].split(';')[0])
  assert _newest_checkpoint(workdir) == step
  return r, step


def _stop_lines(r: Run, i: int) -> list[str]:
  return [line for line in r.output(i).splitlines() if 'preempted' in line or line.startswith('error:')]


def _newest_checkpoint(workdir) -> int:
  return max(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())


@needs_fmnist
def test_sigkill_then_sigterm_of_one_of_two_processes_then_resume_equals_uninterrupted(classifier_reference, runs_dir):
  """One 2-process run stopped twice, resumed after each stop, and ending equal to the uninterrupted run."""
  workdir = str(runs_dir / 'cls_stops')
  # SIGKILL of process 1: process 0 stops within 60 s with one line naming the lost process.
  r = Run(CLASSIFIER, workdir, num_processes=2)
  wait_for_checkpoint(workdir, 40, r.procs)
  r.procs[1].send_signal(signal.SIGKILL)
  killed_at = time.time()
  try:
    code = r.procs[0].wait(timeout=60)
  except subprocess.TimeoutExpired:
    r.kill()
    pytest.fail('process 0 still running 60 s after its peer was killed')
  assert time.time() - killed_at < 60
  assert code not in (0, None)
  errors = [line for line in r.output(0).splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and 'process' in errors[0], r.output(0)[-3000:]
  # SIGTERM to process 1 of the resumed run: both stop at the same step, save it and exit 0.
  killed = _newest_checkpoint(workdir)
  r, step = _signal_then_resume(CLASSIFIER, workdir, signal.SIGTERM, 0, num_processes=2, target=1, min_step=killed + 40)
  assert f'resuming from step {killed}' in r.output(0)
  assert 'restart the same command to resume' in r.output(0)
  assert step % 100  # mid-epoch
  assert _stop_lines(r, 0) == _stop_lines(r, 1)
  run(CLASSIFIER, workdir, num_processes=2)
  assert_same_run(workdir, classifier_reference)


@needs_fmnist
def test_ctrl_c_in_one_process_then_resume_equals_uninterrupted(classifier_reference, runs_dir):
  workdir = str(runs_dir / 'cls_signals')
  _signal_then_resume(CLASSIFIER, workdir, signal.SIGINT, 130, devices=2)
  shutil.copytree(workdir, str(runs_dir / 'cls_topology'))  # saved on 2 devices: the topology test's start
  run(CLASSIFIER, workdir, devices=2)
  assert_same_run(workdir, classifier_reference)


@needs_fmnist
def test_checkpoint_on_two_devices_resumes_on_one_and_back(runs_dir):
  workdir = str(runs_dir / 'cls_topology')
  if not os.path.isdir(workdir):
    pytest.skip('needs the checkpoint of test_ctrl_c_in_one_process...')
  saved = _newest_checkpoint(workdir)
  r, step = _signal_then_resume(CLASSIFIER, workdir, signal.SIGTERM, 0, devices=1, min_step=saved + 40)
  assert f'resuming from step {saved}, saved on 2 devices, now 1' in r.output(0)
  r = run(CLASSIFIER, workdir, devices=2)
  assert f'resuming from step {step}, saved on 1 device, now 2' in r.output(0)
  assert results(workdir)['epochs_trained'] == 2


@pytest.mark.slow
@needs_fmnist
@pytest.mark.parametrize('signum, target', [(signal.SIGTERM, [1]), (signal.SIGHUP, [0, 1])])
def test_signal_at_the_default_steps_per_call_stops_every_process_at_one_step(runs_dir, signum, target):
  # steps_per_call=8 (the default): JAX's preemption sync point counts calls, so steps never meet it. The
  # processes may agree on a call well after the signal (hundreds of steps on one loaded CPU): 400 steps.
  workdir = str(runs_dir / f'cls_spc8_{signum.name}')
  args = [a for a in CLASSIFIER if 'steps_per_call' not in a and 'num_train' not in a]
  args.append('--config.data.num_train=1600')
  r = Run(args, workdir, num_processes=2)
  wait_for_checkpoint(workdir, 40, r.procs)
  for i in target:
    r.procs[i].send_signal(signum)
  assert r.wait() == [0, 0], r.output(0)[-3000:]
  lines = [_stop_lines(r, i) for i in range(2)]
  by = '' if signum == signal.SIGTERM else f' ({signum.name})'
  assert lines[0] == lines[1] and len(lines[0]) == 1 and by + '; restart the same command' in lines[0][0], lines
  step = int(lines[0][0].split(' at step ')[1].split(' ')[0].rstrip(';'))
  assert step % 8 == 0 and _newest_checkpoint(workdir) == step
  for i in range(2):
    assert 'Traceback' not in r.output(i) and 'Check failure' not in r.output(i)


@pytest.mark.slow
@needs_fmnist
@pytest.mark.parametrize('case', ['other_config', 'same_process_id', 'port_taken'])
def test_processes_that_disagree_or_collide_stop_with_one_line(runs_dir, case):
  workdir = str(runs_dir / f'collide_{case}')
  extra = {
    'other_config': {1: ['--config.optimizer.learning_rate=0.1']},
    'same_process_id': {0: ['--distributed_timeout=10'], 1: ['--process_id=0', '--distributed_timeout=10']},
    'port_taken': {0: ['--distributed_timeout=10'], 1: ['--distributed_timeout=10']},
  }[case]
  with socket.socket() as holder:
    port = None
    if case == 'port_taken':
      holder.bind(('localhost', 0))
      holder.listen()
      port = holder.getsockname()[1]
    r = Run(CLASSIFIER, workdir, num_processes=2, extra=extra, port=port, limit_s=300)
    codes = r.wait()
  assert codes == [2, 2], [r.output(i)[-2000:] for i in range(2)]
  expected = {
    'other_config': ['config.optimizer.learning_rate: 0.01 on process 0, 0.1 here'] * 2,
    'same_process_id': ['did not all join', '--process_id=0 is already taken on this machine'],
    'port_taken': ['is already in use on this machine', 'did not all join'],
  }[case]
  lines = [_stop_lines(r, i) for i in range(2)]
  assert [len(x) for x in lines] == [1, 1], [r.output(i)[-2000:] for i in range(2)]
  if case == 'same_process_id':  # whichever of the two claims id 0 first waits for a process 1 in vain
    lines.sort(key=lambda x: 'already taken' in x[0])
  for i in range(2):
    assert expected[i] in lines[i][0], lines
    assert 'Traceback' not in r.output(i) and 'Check failure' not in r.output(i)


@pytest.mark.slow
@needs_fmnist
def test_rerun_of_a_finished_two_process_workdir_exits_cleanly(runs_dir):
  workdir = str(runs_dir / 'cls_2x1')
  if not os.path.exists(os.path.join(workdir, 'results.json')):
    pytest.skip('needs the finished run of test_two_processes_equal_one_process_two_devices...')
  before = results(workdir)
  r = run(CLASSIFIER, workdir, num_processes=2, log_dir=str(runs_dir / 'cls_2x1_rerun'), limit_s=600)
  assert results(workdir) == before
  for i in range(2):
    assert 'Check failure' not in r.output(i) and 'Traceback' not in r.output(i)
