"""The README's "From Python" session, run exactly as written there."""

import json
import os
import re

import pytest

from conftest import needs_fmnist
from conftest import ROOT

BEGIN, END = '<!-- python-session -->', '<!-- /python-session -->'


def readme_session() -> str:
  """The python code block between the README's python-session markers."""
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    text = f.read()
  assert BEGIN in text and END in text, (
    f'README.md lacks the {BEGIN} ... {END} block (the "From Python" section); paste it from the notes'
  )
  section = text[text.index(BEGIN) + len(BEGIN) : text.index(END)]
  blocks = re.findall(r'```python\n(.*?)```', section, flags=re.DOTALL)
  assert len(blocks) == 1, f'expected one ```python block between the markers, found {len(blocks)}'
  return blocks[0]


@pytest.mark.slow
@needs_fmnist
def test_readme_python_session_runs_as_written(capsys):
  namespace = {'__name__': '__readme__'}
  exec(compile(readme_session(), 'README.md:python-session', 'exec'), namespace)
  results, workdir = namespace['results'], namespace['workdir']
  assert results['epochs_trained'] == 1 and results['best_epoch'] == 1
  assert results['test_accuracy'] > 0.2  # 10 classes: chance is 0.1
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['test_accuracy'] == results['test_accuracy']
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['optimizer']['learning_rate'] == 0.05  # the override reached the run
  assert 'test accuracy' in capsys.readouterr().out
