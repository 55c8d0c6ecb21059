"""The README's "Extending" examples: each code excerpt is the example file's text, each command runs as written."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _extending_section() -> str:
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    text = f.read()
  start = text.index('\n## Extending\n')
  end = text.index('\n## ', start + 1)
  return text[start:end]


def _blocks(kind: str) -> list[str]:
  return re.findall(rf'```{kind}\n(.*?)```', _extending_section(), re.S)


def _example_files() -> dict[str, str]:
  out = {}
  for name in sorted(os.listdir(os.path.join(ROOT, 'examples'))):
    if name.endswith('.py'):
      with open(os.path.join(ROOT, 'examples', name), encoding='utf-8') as f:
        out[name] = f.read()
  return out


def test_each_python_excerpt_is_text_of_an_example_file():
  files = _example_files()
  blocks = _blocks('python')
  assert len(blocks) == 2
  for block in blocks:
    assert any(block in text for text in files.values()), f'README excerpt not found in examples/: {block[:80]}'


def _commands() -> list[list[str]]:
  commands = []
  for block in _blocks('bash'):
    for line in block.strip().splitlines():
      argv = shlex.split(line)
      assert argv[0] == '.venv/bin/python', line
      commands.append([sys.executable, *argv[1:]])
  return commands


def test_the_readme_names_three_examples():
  scripts = [c[1] for c in _commands()]
  assert scripts == ['launch.py', 'launch.py', 'examples/captions_from_tsv.py', 'launch.py']


@pytest.mark.slow
def test_each_command_runs_as_written(tmp_path):
  # The commands write under runs/: run them from a folder that mirrors the checkout, so nothing lands in it.
  for name in ('launch.py', 'configs', 'examples', 'cnn_caption'):
    os.symlink(os.path.join(ROOT, name), tmp_path / name)
  env = {**os.environ, 'PYTHONPATH': str(tmp_path)}
  for argv in _commands():
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f'{" ".join(argv)}\n{done.stderr[-3000:]}'
  results = {
    name: json.loads((tmp_path / 'runs' / name / 'results.json').read_text())
    for name in ('wide_cnn', 'regression', 'my_captioner')
  }
  assert results['wide_cnn']['num_params'] == (9 * 64 + 64) + (9 * 64 * 128 + 128) + (128 * 10 + 10)
  assert results['regression']['test_neg_mse'] > -0.2  # the MLP learned something (sin(3x) has variance ~0.5)
  assert 'test_cider' in results['my_captioner']
  dataset = json.loads((tmp_path / 'runs' / 'my_captions' / 'dataset.json').read_text())
  assert [sum(e['split'] == s for e in dataset['images']) for s in ('train', 'val', 'test')] == [12, 2, 2]
