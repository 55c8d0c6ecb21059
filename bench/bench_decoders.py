"""Caption decoders next to the PyTorch peer at its shape, one pinned core, interleaved. Prints JSON lines.

  python bench/bench_decoders.py --peer_python=/work/peer-venv/bin/python
  python bench/bench_decoders.py --variants=attention --reps=5 --half_precision

Shape (the peer's): batch 32, 49 regions x 1280 channels, vocabulary 400, embed 256, hidden 512, attention
512, captions of 30 tokens (29 teacher-forced steps), 30 decoding steps. The project side is what training
runs: `jax.jit(train.train_steps, donate_argnums=0)` with the captioning task's `caption_loss` and metrics and
the captioner config's optimizer (Adam with gradient clipping; the peer: Adam, no clipping), and the task's
jitted `greedy_decode` / `beam_search` (an EOS the model never emits, so every caption runs all 30 steps,
as the peer does). The peer is /work/shared/peers/torch_captioner.py, a fresh pinned process per repetition.
FLOPs are counted for the peer's formulation (the project hoists some of them out of the time loop).
"""

import argparse
import functools
import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

ROOT = common.ROOT
BATCH, REGIONS, CHANNELS, VOCAB, EMBED, HIDDEN, ATTN, LEN = 32, 49, 1280, 400, 256, 512, 512, 30


def peer_flops(variant: str, phase: str) -> float:
  """Forward FLOPs per caption of the peer's formulation (x3 for a training step)."""
  init = 2 * 2 * CHANNELS * HIDDEN
  lstm_in = EMBED + (CHANNELS if variant == 'attention' else 0)
  per_step = 2 * (lstm_in + HIDDEN) * 4 * HIDDEN + 2 * HIDDEN * VOCAB
  once = init
  if variant == 'attention':
    per_step += 2 * HIDDEN * ATTN + 2 * REGIONS * ATTN + 2 * REGIONS * CHANNELS
    once += 2 * REGIONS * CHANNELS * ATTN
  if phase == 'train':
    return 3.0 * (once + (LEN - 1) * per_step)
  return once + LEN * per_step


def make_project(variant: str, args, half_precision: bool = False) -> dict:
  """Compiled project paths for one decoder: {'train': fn, 'greedy': fn, 'beam': fn}, each -> items/s."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  sys.path.insert(0, ROOT)
  from cnn_caption import models
  from cnn_caption import train
  from cnn_caption.tasks import captioning
  from cnn_caption.training import optim
  from cnn_caption.training import parallel

  sys.path.insert(0, os.path.join(ROOT, 'configs'))
  import captioner

  config = captioner.get_config()
  config.model.embed_dim, config.model.hidden_dim = EMBED, HIDDEN
  config.model.attention_dim = ATTN if variant == 'attention' else None
  config.data.max_caption_len = LEN - 1
  config.decoding.max_len = LEN
  overrides = {'dtype': jnp.bfloat16} if half_precision else {}
  model = models.create_model(config, vocab_size=VOCAB, **overrides)
  tx = optim.make_optimizer(config.optimizer, 1000)
  rng = np.random.default_rng(0)
  feats = rng.standard_normal((BATCH, REGIONS, CHANNELS)).astype(np.float32)
  lengths = rng.integers(7, LEN, (BATCH, 1))
  tokens = np.where(np.arange(LEN)[None] <= lengths, rng.integers(3, VOCAB, (BATCH, LEN)), 0).astype(np.int32)
  tokens[:, 0] = 1
  state = train.create_train_state(model, (jnp.asarray(feats[:1]), jnp.asarray(tokens[:1, :-1])), jax.random.key(0), tx)
  task = types.SimpleNamespace(
    loss=functools.partial(captioning.caption_loss, doubly_stochastic=config.loss.doubly_stochastic),
    metrics=captioning.CaptioningTask.metrics,
  )
  fn = jax.jit(functools.partial(train.train_steps, task=task, num_steps=config.steps_per_call), donate_argnums=0)
  batches = {
    'feats': feats[None].repeat(config.steps_per_call, 0),
    'tokens': tokens[None].repeat(config.steps_per_call, 0),
  }
  key = jax.random.key(1)
  holder = {'state': state}
  holder['state'], m = fn(holder['state'], batches, key)
  jax.block_until_ready(m)
  params = jax.tree.map(jnp.array, holder['state'].params)  # a copy the donated state does not invalidate

  def train_rate() -> float:
    calls, t0 = 0, time.perf_counter()
    while calls < args.min_calls or time.perf_counter() - t0 < args.seconds:
      holder['state'], m = fn(holder['state'], batches, key)
      calls += 1
    jax.block_until_ready(m)
    return calls * config.steps_per_call * BATCH / (time.perf_counter() - t0)

  # The task's own decoding closures, jitted as CaptioningTask._decode_fn does, on a stand-in task object
  # (the real one needs a dataset); eos_id = VOCAB is never emitted, so all LEN steps run.
  stand_in = types.SimpleNamespace(
    config=config,
    model=model,
    mesh=parallel.make_mesh(),
    _decoders={},
    ensemble=False,
    vocab=types.SimpleNamespace(bos_id=1, eos_id=VOCAB),
  )
  decode_fn = captioning.CaptioningTask._decode_fn
  d = config.decoding
  decode = {'greedy': decode_fn(stand_in, 1), 'beam': decode_fn(stand_in, d.beam_size, d.length_penalty)}
  feats_dev = jnp.asarray(feats)
  for f in decode.values():
    jax.block_until_ready(f(params, feats_dev))

  def decode_rate(method: str) -> float:
    calls, t0 = 0, time.perf_counter()
    while calls < args.min_calls or time.perf_counter() - t0 < args.seconds:
      out = decode[method](params, feats_dev)
      calls += 1
    jax.block_until_ready(out)
    return calls * BATCH / (time.perf_counter() - t0)

  return {
    'train': train_rate,
    'greedy': lambda: decode_rate('greedy'),
    'beam': lambda: decode_rate('beam'),
    'beam_size': config.decoding.beam_size,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  common.add_common_flags(parser)
  parser.add_argument('--variants', default='plain,attention')
  parser.add_argument('--seconds', type=float, default=3.0, help='project seconds per path and repetition')
  parser.add_argument('--min_calls', type=int, default=3, help='project calls per path and repetition, at least')
  parser.add_argument('--half_precision', action='store_true', help='also time bfloat16 compute (reported apart)')
  args = parser.parse_args()
  common.pin(args.core)
  common.emit(common.header(args, 'decoders'))
  peak = common.cpu_peak(args)
  variants = args.variants.split(',')
  project = {v: make_project(v, args) for v in variants}
  if args.half_precision:
    project.update({v + '_bf16': make_project(v, args, half_precision=True) for v in variants})
  sides = {}
  for name, paths in project.items():
    for phase in ('train', 'greedy', 'beam'):
      sides[f'{name}/{phase}'] = paths[phase]
  if args.peer_python:
    flags = [
      '--batch-size',
      str(BATCH),
      '--threads',
      '1',
      '--decoders',
      ','.join(variants),
      '--train-steps',
      '10',
      '--decode-batches',
      '10',
      '--max-seconds',
      '10',
      '--decode-steps',
      str(LEN),
    ]
    sides['peer'] = lambda: common.run_peer(args, 'torch_captioner.py', flags)
  results = common.interleave(args.reps, sides)
  for variant in variants:
    for phase in ('train', 'greedy'):
      peer = []
      for lines in results.get('peer', []):
        for line in lines:
          if line['decoder'] == variant and line['phase'] == phase:
            peer.append(line['samples_per_s' if phase == 'train' else 'captions_per_s'])
      extra = {'batch_size': BATCH}
      if args.half_precision:
        extra['project_bf16'] = common.spread(results[f'{variant}_bf16/{phase}'])
      common.emit(
        common.compare(
          'decoders',
          f'{variant}_{phase}',
          'samples/s' if phase == 'train' else 'captions/s',
          results[f'{variant}/{phase}'],
          {'eager': peer},
          peer_flops(variant, phase),
          peak,
          **extra,
        )
      )
    greedy, beam = results[f'{variant}/greedy'], results[f'{variant}/beam']
    record = common.compare(
      'decoders', f'{variant}_beam{project[variant]["beam_size"]}', 'captions/s', beam, {}, None, None, batch_size=BATCH
    )
    record['cost_vs_greedy'] = round(sorted(greedy)[len(greedy) // 2] / sorted(beam)[len(beam) // 2], 2)
    common.emit(record)
    if args.profile:
      for phase in ('train', 'greedy', 'beam'):
        trace = common.profiled(os.path.join(args.profile, f'{variant}_{phase}'), project[variant][phase])
        common.emit({'bench': 'decoders', 'path': f'{variant}_{phase}', 'profile': trace})


if __name__ == '__main__':
  main()
