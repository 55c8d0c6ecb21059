"""EMA of the parameters: the update rule, its warm-up, accumulation steps, and no cost when off."""

from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnn_caption.training import ema


def make_state(decay, every=1, tx=None):
  return ema.TrainState.create(
    apply_fn=None, params={'w': jnp.zeros(3)}, tx=tx or optax.sgd(1.0), ema_decay=decay, ema_every=every
  )


def test_ema_follows_the_parameters_with_warmup():
  state = make_state(0.9)
  grads = {'w': -jnp.ones(3)}  # sgd(1.0): params after step t are t * ones
  expected = np.zeros(3)
  for t in range(1, 31):
    state = state.apply_gradients(grads=grads)
    d = min(0.9, t / (9 + t))  # (1 + n) / (10 + n) with n = t - 1 updates before this one
    expected = d * expected + (1 - d) * t
    np.testing.assert_allclose(state.ema_params['w'], expected, rtol=1e-5)
  assert 0 < float(state.ema_params['w'][0]) < 30  # lags behind the parameters


def test_ema_waits_for_accumulated_updates():
  tx = optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2)
  state = make_state(0.5, every=2, tx=tx)
  state = state.apply_gradients(grads={'w': -jnp.ones(3)})  # micro-step: no update, EMA unchanged
  np.testing.assert_array_equal(state.params['w'], 0.0)
  np.testing.assert_array_equal(state.ema_params['w'], 0.0)
  state = state.apply_gradients(grads={'w': -jnp.ones(3)})  # update with the mean gradient: w = 1
  np.testing.assert_allclose(state.params['w'], 1.0)
  d = min(0.5, 1 / 10)
  np.testing.assert_allclose(state.ema_params['w'], (1 - d) * 1.0, rtol=1e-6)


def test_off_means_the_same_leaves_as_flax_train_state():
  plain = train_state.TrainState.create(apply_fn=None, params={'w': jnp.zeros(3)}, tx=optax.adam(1e-3))
  state = make_state(0.0, tx=optax.adam(1e-3))
  assert state.ema_params is None
  assert jax.tree.structure(jax.tree.leaves(state)) == jax.tree.structure(jax.tree.leaves(plain))
  assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(plain))


@pytest.mark.parametrize('decay', [0.0, 0.99])
def test_jitted_step_keeps_the_structure(decay):
  state = make_state(decay)
  step = jax.jit(lambda s: s.apply_gradients(grads={'w': jnp.ones(3)}))
  assert jax.tree.structure(step(state)) == jax.tree.structure(state)
