"""Reads PyTorch `.pth` state dicts into numpy arrays without importing torch.

Both on-disk formats are handled:
  * legacy (torch < 1.6, and `_use_new_zipfile_serialization=False`): a magic-number
    pickle, a protocol-version pickle, a sys-info pickle, the state-dict pickle whose
    storages are persistent ids, a pickled list of storage keys, then for each key an
    int64 element count and the raw little-endian bytes;
  * zip (torch >= 1.6 default): `<prefix>/data.pkl` plus one `<prefix>/data/<key>`
    record of raw bytes per storage.

The pickles are read by a restricted unpickler: `find_class` hands out stand-ins for the
few names a state dict needs and raises UserError for anything else, so no callable from
the file is ever resolved to real code.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

from cnn_caption.errors import UserError

# No single tensor of the supported encoders comes near this; a file claiming more is refused before allocating.
MAX_TENSOR_BYTES = 4 * 2**30
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
  'DoubleStorage': np.dtype('<f8'),
  'FloatStorage': np.dtype('<f4'),
  'HalfStorage': np.dtype('<f2'),
  'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
  'LongStorage': np.dtype('<i8'),
  'IntStorage': np.dtype('<i4'),
  'ShortStorage': np.dtype('<i2'),
  'CharStorage': np.dtype('i1'),
  'ByteStorage': np.dtype('u1'),
  'BoolStorage': np.dtype('?'),
}


class _StorageType:
  """Stand-in for a `torch.<X>Storage` class: only its dtype matters."""

  __slots__ = ('dtype',)

  def __init__(self, dtype: np.dtype):
    self.dtype = dtype

  def __setstate__(self, state):
    raise pickle.UnpicklingError('BUILD on a storage type')


class _Storage:
  """A storage named by a persistent id; its bytes are attached once read."""

  __slots__ = ('key', 'dtype', 'numel', 'array')

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel, self.array = key, dtype, numel, None

  def __setstate__(self, state):
    raise pickle.UnpicklingError('BUILD on a storage')


class _LazyTensor:
  """The arguments of `_rebuild_tensor_v2`; materialised once storages are read."""

  __slots__ = ('storage', 'offset', 'size', 'stride')

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def __setstate__(self, state):
    raise pickle.UnpicklingError('BUILD on a tensor')

  def materialize(self) -> np.ndarray:
    flat = self.storage.array
    if not isinstance(flat, np.ndarray):
      raise pickle.UnpicklingError(f'storage {self.storage.key} has no data')
    size, stride, offset = tuple(self.size), tuple(self.stride), int(self.offset)
    if len(size) != len(stride) or any(n < 0 for n in size) or any(s < 0 for s in stride):
      raise pickle.UnpicklingError(f'bad tensor geometry size={size} stride={stride}')
    if not all(isinstance(n, int) for n in size + stride):
      raise pickle.UnpicklingError(f'bad tensor geometry size={size} stride={stride}')
    numel = math.prod(size)
    if numel * flat.itemsize > MAX_TENSOR_BYTES:
      raise pickle.UnpicklingError(
        f'tensor of size {size} would need {numel * flat.itemsize / 2**30:.1f} GiB, '
        f'over the {MAX_TENSOR_BYTES / 2**30:.0f} GiB limit'
      )
    if numel > flat.size:  # only stride-0 (expanded) views can claim more elements than they store
      raise pickle.UnpicklingError(
        f'tensor of size {size} claims {numel} elements from a storage of {flat.size} (stride {stride})'
      )
    if 0 in size:
      return np.zeros(size, flat.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if offset < 0 or last >= flat.size:
      raise pickle.UnpicklingError(
        f'tensor (offset {offset}, size {size}) overruns its storage of {flat.size} elements'
      )
    view = np.lib.stride_tricks.as_strided(
      flat[offset:], shape=size, strides=[s * flat.itemsize for s in stride], writeable=False
    )
    return np.array(view)  # own contiguous copy, independent of the file buffer


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError('_rebuild_tensor_v2 without a storage')
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  if not isinstance(data, _LazyTensor):
    raise pickle.UnpicklingError('_rebuild_parameter without a tensor')
  return data


def _ordered_dict(*args):
  return collections.OrderedDict(*args)


class _Callable:
  """Wraps an allowed function so BUILD on it cannot alter the real function."""

  __slots__ = ('_fn',)

  def __init__(self, fn):
    self._fn = fn

  def __call__(self, *args, **kwargs):
    return self._fn(*args, **kwargs)

  def __setstate__(self, state):
    raise pickle.UnpicklingError('BUILD on an allowed callable')


def _allowed_global(module: str, name: str):
  if (module, name) == ('collections', 'OrderedDict'):
    return _Callable(_ordered_dict)
  if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
    return _Callable(_rebuild_tensor_v2)
  if (module, name) == ('torch._utils', '_rebuild_parameter'):
    return _Callable(_rebuild_parameter)
  if module == 'torch' and name in _STORAGE_DTYPES:
    return _StorageType(_STORAGE_DTYPES[name])
  return None


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only state-dict names; storages become `_Storage`s."""

  def __init__(self, file, path: str, storages: dict[str, _Storage]):
    super().__init__(file)
    self._path = path
    self._storages = storages

  def find_class(self, module, name):
    found = _allowed_global(module, name)
    if found is None:
      raise UserError(
        f'{self._path}: refusing to load {module}.{name} from the pickle; only plain '
        'tensor state dicts are read (re-save it with torch.save(model.state_dict(), path))'
      )
    return found

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or pid[0] not in ('storage', b'storage'):
      raise pickle.UnpicklingError(f'unsupported persistent id {pid!r:.80}')
    if len(pid) not in (5, 6):
      raise pickle.UnpicklingError(f'unsupported storage id of length {len(pid)}')
    storage_type, key, _, numel = pid[1:5]
    view_metadata = pid[5] if len(pid) == 6 else None
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError('storage id without a storage type')
    key = key.decode() if isinstance(key, bytes) else str(key)
    storage = self._storages.get(key)
    if storage is None:
      storage = self._storages[key] = _Storage(key, storage_type.dtype, int(numel))
    if view_metadata is not None:  # legacy views: (view_key, element offset, element count)
      view_key, view_offset, view_size = view_metadata
      view = _Storage(str(view_key), storage.dtype, int(view_size))
      view.array = ('view', storage, int(view_offset))
      return view
    return storage


def _load_pickle(file, path: str, storages: dict[str, _Storage]):
  return _RestrictedUnpickler(file, path, storages).load()


def _read_legacy(f, path: str):
  file_size = os.fstat(f.fileno()).st_size
  storages: dict[str, _Storage] = {}
  magic = _load_pickle(f, path, storages)
  if magic != _LEGACY_MAGIC:
    raise pickle.UnpicklingError('not a PyTorch file (bad magic number)')
  protocol = _load_pickle(f, path, storages)
  if protocol != _LEGACY_PROTOCOL:
    raise pickle.UnpicklingError(f'unsupported legacy protocol {protocol!r}')
  sys_info = _load_pickle(f, path, storages)
  if isinstance(sys_info, dict) and not sys_info.get('little_endian', True):
    raise pickle.UnpicklingError('big-endian files are not supported')
  result = _load_pickle(f, path, storages)
  keys = _load_pickle(f, path, storages)
  if not isinstance(keys, list):
    raise pickle.UnpicklingError('storage key list missing')
  for key in keys:
    storage = storages.get(str(key))
    if storage is None:
      raise pickle.UnpicklingError(f'storage {key!r} is listed but never used')
    header = f.read(8)
    if len(header) != 8:
      raise pickle.UnpicklingError(f'file ends before storage {key}')
    (numel,) = struct.unpack('<q', header)
    nbytes = numel * storage.dtype.itemsize
    if numel < 0 or nbytes > file_size - f.tell() or nbytes > MAX_TENSOR_BYTES:
      raise pickle.UnpicklingError(f'file ends inside storage {key}')
    raw = f.read(nbytes)
    if len(raw) != nbytes:
      raise pickle.UnpicklingError(f'file ends inside storage {key}')
    storage.array = np.frombuffer(raw, storage.dtype)
  return result


def _read_zip(path: str):
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pkl = [n for n in names if n.endswith('/data.pkl') or n == 'data.pkl']
    if len(pkl) != 1:
      raise pickle.UnpicklingError('zip archive without exactly one data.pkl')
    prefix = pkl[0][: -len('data.pkl')]
    byteorder = prefix + 'byteorder'
    if byteorder in names and archive.read(byteorder).strip() not in (b'little', b''):
      raise pickle.UnpicklingError('big-endian files are not supported')
    storages: dict[str, _Storage] = {}
    result = _load_pickle(io.BytesIO(archive.read(pkl[0])), path, storages)
    for key, storage in storages.items():
      record = f'{prefix}data/{key}'
      if record not in names:
        raise pickle.UnpicklingError(f'record {record} missing')
      claimed = archive.getinfo(record).file_size
      if storage.numel < 0 or claimed > MAX_TENSOR_BYTES:
        raise pickle.UnpicklingError(
          f'record {record} claims {claimed} bytes, over the {MAX_TENSOR_BYTES / 2**30:.0f} GiB limit'
        )
      if claimed < storage.numel * storage.dtype.itemsize:
        raise pickle.UnpicklingError(f'record {record} is shorter than its storage')
      raw = archive.read(record)
      if len(raw) < storage.numel * storage.dtype.itemsize:
        raise pickle.UnpicklingError(f'record {record} is shorter than its storage')
      storage.array = np.frombuffer(raw, storage.dtype, count=storage.numel)
  return result


def _resolve_views(value):
  """Legacy view storages point into their root storage; make them arrays."""
  if isinstance(value, _LazyTensor) and isinstance(value.storage.array, tuple):
    _, root, start = value.storage.array
    if root.array is None:
      raise pickle.UnpicklingError(f'storage {root.key} has no data')
    value.storage.array = root.array[start : start + value.storage.numel]
  return value


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a PyTorch state dict (legacy or zip `.pth`) without torch.

  Args:
    path: a file written by `torch.save(module.state_dict(), path)`.

  Returns:
    Parameter and buffer name -> numpy array (a copy, in the saved dtype and shape).

  Raises:
    UserError: the file is missing, is not a tensor state dict, is damaged, or asks
      the unpickler for anything beyond plain tensors.
  """
  if not os.path.isfile(path):
    raise UserError(f'weights file {path} does not exist; pass an existing .pth file')
  try:
    if zipfile.is_zipfile(path):
      result = _read_zip(path)
    else:
      with open(path, 'rb') as f:
        result = _read_legacy(f, path)
    if not isinstance(result, dict):
      raise pickle.UnpicklingError(f'top-level object is {type(result).__name__}, not a dict')
    state = {}
    for name, value in result.items():
      if not isinstance(value, _LazyTensor):
        raise pickle.UnpicklingError(f'entry {name!r} is not a tensor')
      state[str(name)] = _resolve_views(value).materialize()
  except UserError:
    raise
  except (
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    KeyError,
    IndexError,
    struct.error,
    OSError,
  ) as e:
    raise UserError(f'weights file {path} is not a readable PyTorch state dict: {e}') from None
  return state
