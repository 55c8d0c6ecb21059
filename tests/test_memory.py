"""cnn_caption.training.memory: a call's bytes from XLA's memory analysis, checked against free memory."""

import jax
import jax.numpy as jnp
import pytest

from cnn_caption.errors import UserError
from cnn_caption.training import memory


def _matmul_chain(x):
  return jnp.tanh(x @ x.T) @ x


def test_call_bytes_counts_arguments_outputs_and_temporaries():
  x = jax.ShapeDtypeStruct((512, 256), jnp.float32)
  need = memory.call_bytes(jax.jit(_matmul_chain).lower(x).compile())
  # The 512x256 argument and output (512 KiB each) at least, plus the 512x512 intermediate (1 MiB).
  assert need >= 2 * 512 * 256 * 4 + 512 * 512 * 4
  assert need < 16 * 2**20


def test_a_call_that_cannot_fit_names_the_knob(monkeypatch):
  monkeypatch.setattr(memory, 'available_bytes', lambda device: 2**20)
  x = jax.ShapeDtypeStruct((512, 256), jnp.float32)
  with pytest.raises(UserError, match=r'evaluation with config.eval_batch_size=512 needs about .* lower --config'):
    memory.compile_within_memory(jax.jit(_matmul_chain), (x,), knob='eval_batch_size', value=512, what='evaluation')
  # The same call with room to spare compiles; an unknown amount of free memory skips the check.
  monkeypatch.setattr(memory, 'available_bytes', lambda device: 2**34)
  memory.compile_within_memory(jax.jit(_matmul_chain), (x,), knob='eval_batch_size', value=512, what='evaluation')
  monkeypatch.setattr(memory, 'available_bytes', lambda device: None)
  memory.compile_within_memory(jax.jit(_matmul_chain), (x,), knob='eval_batch_size', value=512, what='evaluation')


def test_host_available_bytes_is_read_on_cpu():
  free = memory.available_bytes(jax.devices('cpu')[0])
  assert free is not None and free > 2**20


def test_checked_jit_compiles_once_per_signature_and_computes_the_same():
  fn = memory.CheckedJit(_matmul_chain, knob='eval_batch_size', value=8, what='evaluation')
  x = jnp.arange(8 * 4, dtype=jnp.float32).reshape(8, 4) / 32
  fn.check(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding))
  assert len(fn._compiled) == 1
  y = fn(x)
  assert len(fn._compiled) == 1
  assert jnp.allclose(y, jax.jit(_matmul_chain)(x))
  fn(jnp.ones((4, 4)))
  assert len(fn._compiled) == 2
