"""Caption decoder speed at the PyTorch peer's shape, one pinned core; prints one JSON line per measurement.

  .venv/bin/python bench/bench_decoders.py [--cpu=0] [--reps=5] [--variants=plain,attention]

Shape: batch 32, 49 regions x 1280 channels, vocabulary 400, embed 256, hidden 512, attention 512,
30 steps. Random weights and data; decoding uses an EOS id the model never emits, so every caption
runs all 30 steps (the peer's setting). The process pins itself to one core before importing jax.
Reference PyTorch eager peer, same machine, one core: plain 120 train samples/s and 308 greedy
captions/s; attention 40 and 109.
"""

import argparse
import functools
import json
import os
import statistics
import time

PEER = {'plain': {'train': 120.0, 'greedy': 308.0}, 'attention': {'train': 40.0, 'greedy': 109.0}}


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--cpu', type=int, default=0, help='core to pin to; -1 leaves affinity alone')
  parser.add_argument('--reps', type=int, default=5, help='timed repetitions (median reported)')
  parser.add_argument('--calls', type=int, default=3, help='calls per repetition')
  parser.add_argument('--variants', default='plain,attention')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--beam_size', type=int, default=3)
  return parser.parse_args()


def _time(fn, args, reps, calls):
  """(compile+first call seconds, median seconds per call over reps)."""
  import jax  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  per_call = []
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    per_call.append((time.perf_counter() - start) / calls)
  return first, statistics.median(per_call), per_call


def main():
  args = _parse()
  if args.cpu >= 0:
    os.sched_setaffinity(0, {args.cpu})  # before jax starts its thread pool
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from cnn_caption.models import decoders  # pylint: disable=g-import-not-at-top

  batch, regions, channels, vocab, steps = args.batch, 49, 1280, 400, 30
  bos, eos_never = 1, vocab  # an id outside the vocabulary: decoding always runs max_len steps
  rng = jax.random.key(0)
  feats = jax.random.normal(jax.random.fold_in(rng, 1), (batch, regions, channels), jnp.float32)
  tokens = jax.random.randint(jax.random.fold_in(rng, 2), (batch, steps + 1), 3, vocab, jnp.int32)
  lengths = jax.random.randint(jax.random.fold_in(rng, 3), (batch, 1), 8, steps + 1)
  tokens = jnp.where(jnp.arange(steps + 1)[None] <= lengths, tokens, 0).at[:, 0].set(bos)
  print(json.dumps({'devices': str(jax.devices()), 'affinity': sorted(os.sched_getaffinity(0)),
                    'jax': jax.__version__}), flush=True)

  for variant in args.variants.split(','):
    model = decoders.CaptionDecoder(vocab_size=vocab, embed_dim=256, hidden_dim=512, dropout=0.5,
                                    attention_dim=512 if variant == 'attention' else None)
    params = model.init(jax.random.fold_in(rng, 4), feats, tokens[:, :-1], train=False)['params']
    tx = optax.adam(4e-4)
    opt_state = tx.init(params)

    def train_step(params, opt_state, feats, tokens, step_rng, model=model, tx=tx):
      def loss_fn(p):
        logits, _ = model.apply({'params': p}, feats, tokens[:, :-1], train=True,
                                rngs={'dropout': step_rng})
        targets = tokens[:, 1:]
        mask = (targets != 0).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return (ce * mask).sum() / mask.sum()
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    train = jax.jit(train_step)
    first, sec, runs = _time(train, (params, opt_state, feats, tokens, jax.random.fold_in(rng, 5)),
                             args.reps, args.calls)
    print(json.dumps({'variant': variant, 'what': 'train', 'batch': batch, 'samples_per_s':
                      round(batch / sec, 1), 'peer': PEER[variant]['train'],
                      'x_peer': round(batch / sec / PEER[variant]['train'], 2),
                      'compile_and_first_s': round(first, 2),
                      'runs_ms': [round(r * 1e3, 1) for r in runs]}), flush=True)

    greedy = jax.jit(functools.partial(decoders.greedy_decode, model, bos_id=bos, eos_id=eos_never,
                                       max_len=steps))
    first, greedy_sec, runs = _time(greedy, (params, feats), args.reps, args.calls)
    print(json.dumps({'variant': variant, 'what': 'greedy', 'batch': batch, 'captions_per_s':
                      round(batch / greedy_sec, 1), 'peer': PEER[variant]['greedy'],
                      'x_peer': round(batch / greedy_sec / PEER[variant]['greedy'], 2),
                      'compile_and_first_s': round(first, 2),
                      'runs_ms': [round(r * 1e3, 1) for r in runs]}), flush=True)

    beam = jax.jit(functools.partial(decoders.beam_search, model, bos_id=bos, eos_id=eos_never,
                                     max_len=steps, beam_size=args.beam_size))
    first, sec, runs = _time(beam, (params, feats), args.reps, args.calls)
    print(json.dumps({'variant': variant, 'what': f'beam{args.beam_size}', 'batch': batch,
                      'captions_per_s': round(batch / sec, 1),
                      'cost_vs_greedy': round(sec / greedy_sec, 2),
                      'compile_and_first_s': round(first, 2),
                      'runs_ms': [round(r * 1e3, 1) for r in runs]}), flush=True)


if __name__ == '__main__':
  main()
