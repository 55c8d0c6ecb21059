"""Config overrides from the command line and their one-line errors."""

import pytest

from cnn_caption import config_utils
from cnn_caption.errors import UserError
from configs import captioner as captioner_config
from configs import classifier as classifier_config
from conftest import run_launch


@pytest.mark.slow
@pytest.mark.parametrize(
  'args, culprit',
  [
    (['--config.optimizer.lr=0.1'], '--config.optimizer.lr'),
    (['--config.num_epochs=abc'], 'config.num_epochs'),
    (['--config.num_epochs=-1'], 'config.num_epochs=-1'),
    (['--config.optimizer.learning_rate=0'], 'config.optimizer.learning_rate=0'),
    (['--config.model.dropout=1.5'], 'config.model.dropout=1.5'),
    (['--config.data.dir=/nonexistent/fmnist'], '/nonexistent/fmnist'),
  ],
)
def test_bad_overrides_give_one_clear_line(tmp_path, args, culprit):
  result = run_launch('--config=configs/classifier.py:smoke', f'--workdir={tmp_path}', *args, timeout=120)
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr
  error_lines = [line for line in result.stderr.splitlines() if culprit in line]
  assert error_lines, result.stderr[-1500:]
  assert not (tmp_path / 'checkpoints').exists()


@pytest.mark.slow
def test_missing_config_file_is_clear(tmp_path):
  result = run_launch('--config=configs/nope.py', f'--workdir={tmp_path}', timeout=120)
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert 'nope.py' in result.stderr


def test_validate_accepts_defaults_and_rejects_bad_values():
  for config in (classifier_config.get_config(), classifier_config.get_config('sweep'), captioner_config.get_config()):
    config_utils.validate(config)
  config = classifier_config.get_config('sweep')
  config.sweep.learning_rates = (0.1, -1.0)
  with pytest.raises(UserError, match=r'learning_rates\[1\]'):
    config_utils.validate(config)


def test_placeholder_fields_accept_overrides():
  config = captioner_config.get_config()
  assert config.model.attention_dim is None
  config.model.attention_dim = 64  # typed placeholder: an int is accepted ...
  with pytest.raises(TypeError):
    config.model.attention_dim = 'wide'  # ... and a string is not


def test_selection_metric_and_augmentation_fields_are_validated():
  config_utils.validate(classifier_config.get_config('strong'))
  config = captioner_config.get_config()
  assert config.selection_metric == 'bleu4'  # the homework keeps BLEU-4
  config.selection_metric = 'meteor'  # test only: not computed on val
  with pytest.raises(UserError, match="config.selection_metric='meteor'"):
    config_utils.validate(config)
  config = classifier_config.get_config('strong')
  config.data.augment_pad = -2
  with pytest.raises(UserError, match='config.data.augment_pad=-2'):
    config_utils.validate(config)


def test_a_switch_added_later_and_left_off_is_no_resume_difference():
  saved = classifier_config.get_config().to_dict()
  del saved['model']['conv1_as_matmul']  # a checkpoint written before the switch existed
  current = classifier_config.get_config()
  assert config_utils.computation_differences(saved, current.to_dict()) == []
  saved_captioner = captioner_config.get_config().to_dict()
  del saved_captioner['loss']['label_smoothing']  # 0.0 = off, the computation the old checkpoint had
  assert config_utils.computation_differences(saved_captioner, captioner_config.get_config().to_dict()) == []
  current.model.conv1_as_matmul = True  # turned on: other floats, so a resume must refuse it
  assert config_utils.computation_differences(saved, current.to_dict()) == ["model.conv1_as_matmul: '<absent>' -> True"]


def test_xla_options_parse_and_resume():
  assert config_utils.xla_options('') == {}
  assert config_utils.xla_options(None) == {}
  parsed = config_utils.xla_options('xla_cpu_experimental_ynn_fusion_type=, xla_cpu_use_onednn=True,xla_a=512')
  assert parsed == {'xla_cpu_experimental_ynn_fusion_type': '', 'xla_cpu_use_onednn': True, 'xla_a': '512'}
  with pytest.raises(UserError, match="item 'vector_width=512' is not name=value with an XLA option name"):
    config_utils.xla_options('vector_width=512')
  config_utils.check_xla_options('xla_cpu_use_onednn=false')  # XLA accepts it: no error
  # A list value keeps its commas; a bare option name is still refused.
  two = 'xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE,'
  two += 'xla_cpu_use_onednn=false'
  assert config_utils.xla_options(two) == {
    'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE',
    'xla_cpu_use_onednn': False,
  }
  config_utils.check_xla_options(two)
  with pytest.raises(UserError, match="item 'LIBRARY_FUSION_TYPE_DOT' is not name=value"):
    config_utils.xla_options('LIBRARY_FUSION_TYPE_DOT')
  with pytest.raises(UserError, match="item 'xla_cpu_use_onednn' is not name=value"):
    config_utils.xla_options('xla_cpu_use_onednn=false,xla_cpu_use_onednn')
  # A checkpoint from before the field: '' (none) is the computation it had; options set change the floats.
  saved = classifier_config.get_config('strong').to_dict()  # a config whose default is no options
  del saved['xla_options']
  current = classifier_config.get_config('strong')
  assert config_utils.computation_differences(saved, current.to_dict()) == []
  current.xla_options = 'xla_cpu_use_onednn=true'
  assert config_utils.computation_differences(saved, current.to_dict()) == [
    "xla_options: '<absent>' -> 'xla_cpu_use_onednn=true'"
  ]


def test_eval_xla_options_are_checked_and_resume_safe():
  with pytest.raises(UserError, match="config.eval_xla_options item 'xla_cpu_use_onednn' is not name=value"):
    config_utils.xla_options('xla_cpu_use_onednn', 'eval_xla_options')
  with pytest.raises(UserError, match='config.eval_xla_options=.*XLA refuses it'):
    config_utils.check_xla_options('xla_cpu_experimental_ynn_fusion_type=dot', 'eval_xla_options')
  config_utils.check_xla_options(classifier_config.get_config().eval_xla_options, 'eval_xla_options')
  # Evaluation options change no training step: a resume may change them (as eval_batch_size).
  saved = classifier_config.get_config().to_dict()
  current = classifier_config.get_config()
  current.eval_xla_options = ''
  assert config_utils.computation_differences(saved, current.to_dict()) == []


def test_original_variant_is_the_homework_run_as_the_original_program():
  """classifier.py:original changes the program (layers, gradient-norm metric, XLA options) and nothing else."""
  default = config_utils.flatten(classifier_config.get_config().to_dict())
  original = config_utils.flatten(classifier_config.get_config('original').to_dict())
  changed = {k: original[k] for k in default if default[k] != original[k]}
  assert changed == {'model.fast_layers': False, 'log_grad_norm': True, 'xla_options': '', 'eval_xla_options': ''}
