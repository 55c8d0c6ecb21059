"""Question 2.1 checks: the stated (non-)commutations hold, the checks can fail, bad settings are refused."""

import numpy as np
import pytest

from cnn_caption import cli
from cnn_caption.analysis import equivariance
from cnn_caption.errors import UserError
from configs import equivariance as equivariance_config
from conftest import run_launch


def _config(**check):
  config = equivariance_config.get_config()
  # Small, so the O(H W) search over output shifts stays quick.
  config.check.image_shape, config.check.channels, config.check.fc_units = (12, 12, 2), 4, 8
  config.check.shift = (3, 1)
  config.check.update(check)
  return config


def test_statements_hold_with_measured_figures():
  checks = equivariance.equivariance_checks(_config())
  assert len(checks) == 7
  assert all(c.passed for c in checks), [(c.name, c.detail) for c in checks if not c.passed]
  circular = next(c for c in checks if 'circular padding' in c.name)
  interior = next(c for c in checks if 'interior crop' in c.name)
  assert circular.difference < 1e-6 and interior.difference < 1e-6
  # The commuting layers agree to float32 rounding; the others are off by a sizable fraction of the output.
  for c in checks:
    if '!=' in c.name or 'differ' in c.name:
      assert c.difference > 0.05, c.name
  assert checks[-1].name.startswith('control')
  assert f'{circular.difference:.2e}' in circular.detail


def test_cli_prints_pass_lines_and_exit_code(capsys):
  assert cli.equivariance_check(_config()) == 0
  out = capsys.readouterr().out
  assert out.count('[PASS]') == 7 and '7 of 7 checks passed.' in out
  assert cli.equivariance_check(_config(differ_rtol=10.0)) == 1
  assert '[FAIL] control' in capsys.readouterr().out


@pytest.mark.slow
def test_launch_refuses_a_config_without_checks():
  result = run_launch('--config=configs/classifier.py', '--mode=equivariance_check', timeout=120)
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert 'configs/equivariance.py' in result.stderr


def test_checks_fail_when_the_criterion_is_out_of_reach():
  # No layer differs by 10x its own output scale: every "must differ" check (pool, dense, control) fails.
  checks = equivariance.equivariance_checks(_config(differ_rtol=10.0))
  failed = [c.name for c in checks if not c.passed]
  assert len(failed) == 4
  assert any('max pool' in n for n in failed) and any('fully connected' in n for n in failed)
  assert any(n.startswith('control') for n in failed)


def test_translate_fills_zeros_and_roll_wraps():
  x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
  t = np.asarray(equivariance.translate(x, (1, 2)))
  assert (t[0, 0] == 0).all() and (t[0, :, :2] == 0).all()
  assert t[0, 1, 2, 0] == x[0, 0, 0, 0] and t[0, 3, 3, 0] == x[0, 2, 1, 0]
  r = np.asarray(equivariance.roll(x, (1, 2)))
  assert r[0, 0, 0, 0] == x[0, 3, 2, 0]


@pytest.mark.parametrize(
  'check, match',
  [
    ({'shift': (2, 4)}, 'one component odd'),
    ({'image_shape': (11, 12, 1)}, 'must be even'),
    ({'shift': (11, 1)}, 'interior is left'),
  ],
)
def test_bad_settings_are_refused(check, match):
  with pytest.raises(UserError, match=match):
    equivariance.equivariance_checks(_config(**check))
