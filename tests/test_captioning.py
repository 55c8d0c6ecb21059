"""Captioning through the generic trainer: loss masking, end to end, resume, the caption command."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_caption import cli
from cnn_caption import inference
from cnn_caption import train
from cnn_caption.errors import UserError
from cnn_caption.models import encoders
from cnn_caption.tasks import captioning
from cnn_caption.training import checkpoint
from configs import captioner as captioner_config
from configs import captioner_attention as attention_config
from conftest import final_params
from conftest import kill_after_checkpoint
from conftest import override
from conftest import read_jsonl
from conftest import run_launch
from conftest import run_module
from conftest import strip_timing


@pytest.fixture(scope='module')
def shared_dirs(tmp_path_factory):
  """One synthetic set and one feature cache for every run in this module (the encoder runs once)."""
  root = tmp_path_factory.mktemp('captioning')
  return str(root / 'synthetic'), str(root / 'features')


def smoke(config_module, shared_dirs, **overrides):
  config = config_module.get_config('smoke')
  config.data.synthetic_dir, config.encoder.cache_dir = shared_dirs
  config.data.synthetic_num_images = 30
  return override(config, **overrides)


def test_loss_ignores_padding_and_matches_a_hand_computation():
  logits = jax.random.normal(jax.random.key(0), (2, 4, 6))
  tokens = jnp.array([[1, 4, 5, 2, 0], [1, 3, 2, 0, 0]])
  apply_fn = lambda variables, feats, inputs, train, rngs: (logits, None)
  loss, aux = captioning.caption_loss(None, {'feats': None, 'tokens': tokens}, apply_fn=apply_fn, rngs={}, train=True)
  logp = np.asarray(jax.nn.log_softmax(logits))
  targets = np.asarray(tokens[:, 1:])
  picked = [-logp[b, t, targets[b, t]] for b in range(2) for t in range(4) if targets[b, t] != 0]
  assert float(aux['num_tokens']) == 5
  assert float(loss) == pytest.approx(np.mean(picked), rel=1e-5)


def test_label_smoothing_matches_a_hand_computation_and_leaves_evaluation_alone():
  logits = jax.random.normal(jax.random.key(3), (2, 4, 6))
  tokens = jnp.array([[1, 4, 5, 2, 0], [1, 3, 2, 0, 0]])
  apply_fn = lambda variables, feats, inputs, train, rngs: (logits, None)
  batch = {'feats': None, 'tokens': tokens}
  loss = lambda train, eps: float(
    captioning.caption_loss(None, batch, apply_fn=apply_fn, rngs={}, train=train, label_smoothing=eps)[0]
  )
  logp = np.asarray(jax.nn.log_softmax(logits))
  targets = np.asarray(tokens[:, 1:])
  real = [(b, t) for b in range(2) for t in range(4) if targets[b, t] != 0]
  # target 1 - eps + eps/V on the reference word, eps/V on each of the V=6 words
  hand = np.mean([-(0.9 * logp[b, t, targets[b, t]] + 0.1 * logp[b, t].mean()) for b, t in real])
  assert loss(True, 0.1) == pytest.approx(hand, rel=1e-5)
  plain = np.mean([-logp[b, t, targets[b, t]] for b, t in real])
  assert loss(True, 0.0) == pytest.approx(plain, rel=1e-5) != pytest.approx(hand, rel=1e-3)
  assert loss(False, 0.1) == pytest.approx(plain, rel=1e-5)  # val/test losses stay the cross-entropy


@pytest.mark.slow
def test_scheduled_inputs_swap_words_for_samples_and_keep_bos_and_pad():
  inputs = jnp.array([[1, 4, 5, 3, 2, 0], [1, 3, 2, 0, 0, 0]])
  # Each position's prediction is (almost surely) word 7 - t: the sample for input t is 8 - t.
  logits = np.full((2, 6, 9), -30.0, np.float32)
  logits[:, np.arange(6), 7 - np.arange(6)] = 30.0  # (B, T, V): position t peaks at word 7 - t
  logits = jnp.asarray(logits)
  rng = jax.random.key(0)
  np.testing.assert_array_equal(captioning.scheduled_inputs(inputs, logits, 0.0, rng), inputs)
  every = np.asarray(captioning.scheduled_inputs(inputs, logits, 0.9999, rng))
  expected = np.array([[1, 7, 6, 5, 4, 0], [1, 7, 6, 0, 0, 0]])  # input t <- sample of logits[:, t - 1]
  np.testing.assert_array_equal(every, expected)
  many = np.asarray(captioning.scheduled_inputs(jnp.repeat(inputs, 500, 0), jnp.repeat(logits, 500, 0), 0.25, rng))
  real = np.repeat(inputs, 500, 0)[:, 1:] != 0
  swapped = (many[:, 1:] != np.repeat(inputs, 500, 0)[:, 1:])[real].mean()
  assert 0.2 < swapped < 0.3  # about the rate, over 3,000 real words
  assert (many[:, 0] == 1).all() and (many[:, 1:][~real] == 0).all()


def test_scheduled_sampling_loss_is_teacher_forced_on_the_mixed_inputs():
  tokens = jnp.array([[1, 4, 5, 2, 0], [1, 3, 2, 0, 0]])
  seen = []

  def apply_fn(variables, feats, inputs, train, rngs=None):
    seen.append((np.asarray(inputs), train))
    return jnp.sin(jnp.arange(2 * 4 * 6, dtype=jnp.float32)).reshape(2, 4, 6) * 3.0 + inputs[..., None], None

  batch = {'feats': None, 'tokens': tokens}
  rngs = {'dropout': jax.random.key(5)}
  loss, _ = captioning.caption_loss(None, batch, apply_fn=apply_fn, rngs=rngs, train=True, scheduled_sampling=0.5)
  (first, first_train), (mixed, second_train) = seen
  assert not first_train and second_train  # the sampling pass runs without dropout
  np.testing.assert_array_equal(first, tokens[:, :-1])
  assert (mixed != first).any()  # rate 0.5 over 5 real words: some swapped (fixed rng)
  # Same targets: the reference words (the last input column never feeds a target).
  logits = apply_fn(None, None, jnp.asarray(mixed), True)[0]
  targets = np.asarray(tokens[:, 1:])
  logp = np.asarray(jax.nn.log_softmax(logits))
  hand = np.mean([-logp[b, t, targets[b, t]] for b in range(2) for t in range(4) if targets[b, t] != 0])
  assert float(loss) == pytest.approx(hand, rel=1e-5)
  seen.clear()
  captioning.caption_loss(None, batch, apply_fn=apply_fn, rngs=rngs, train=False, scheduled_sampling=0.5)
  assert len(seen) == 1 and (seen[0][0] == tokens[:, :-1]).all()  # evaluation: the reference inputs, one pass


def test_doubly_stochastic_term_adds_to_the_loss():
  logits = jnp.zeros((1, 3, 5))
  alphas = jnp.full((1, 3, 4), 0.25)
  tokens = jnp.array([[1, 3, 2, 0]])
  apply_fn = lambda *a, **k: (logits, alphas)
  base, _ = captioning.caption_loss(None, {'feats': None, 'tokens': tokens}, apply_fn=apply_fn, rngs={}, train=True)
  reg, _ = captioning.caption_loss(
    None, {'feats': None, 'tokens': tokens}, apply_fn=apply_fn, rngs={}, train=True, doubly_stochastic=1.0
  )
  # two real target steps: each region's coverage is 0.5, so the term is 4 * (1 - 0.5)^2 = 1.
  assert float(reg - base) == pytest.approx(1.0)


@pytest.mark.slow
def test_attention_smoke_run_and_caption_command(tmp_path, shared_dirs, capsys):
  workdir = str(tmp_path / 'run')
  # Selected on CIDEr-D: the task reads config.selection_metric, the trainer the task's.
  results = train.train_and_evaluate(smoke(attention_config, shared_dirs, selection_metric='cider'), workdir)
  for name in (
    'metrics.jsonl',
    'results.json',
    'test_captions.json',
    'vocab.json',
    'config.json',
    'plots/train_loss.png',
    'plots/val_bleu4.png',
    'plots/val_cider.png',
  ):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  saved = json.loads(open(os.path.join(workdir, 'results.json')).read())
  assert {
    'test_bleu1',
    'test_bleu4',
    'test_bleu4_sentence_mean',
    'test_rouge_l',
    'test_cider',
    'best_epoch',
    'decoding',
    'config',
  } <= set(saved)
  assert 'test_meteor' not in saved  # the smoke config leaves METEOR (Java) out
  assert saved['best_val_cider'] == max(r['val_cider'] for r in read_jsonl(os.path.join(workdir, 'metrics.jsonl')))
  assert saved['dataset'] == 'synthetic'
  history = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  assert [r['epoch'] for r in history] == [1, 2]
  assert all(0.0 <= r['val_bleu4'] <= 1.0 and np.isfinite(r['train_loss']) for r in history)
  assert all(0.0 <= r['val_rouge_l'] <= 1.0 and r['val_cider'] >= 0.0 for r in history)
  assert history[1]['train_loss'] < history[0]['train_loss']
  captions = json.loads(open(os.path.join(workdir, 'test_captions.json')).read())
  assert len(captions) == results['num_images']['test']
  assert all(
    set(c) == {'image_name', 'caption', 'references', 'cider', 'bleu4', 'rouge_l', 'class'}
    and isinstance(c['caption'], list)
    for c in captions
  )
  assert np.mean([c['cider'] for c in captions]) == pytest.approx(saved['test_cider'])
  assert np.mean([c['bleu4'] for c in captions]) == pytest.approx(saved['test_bleu4_sentence_mean'])
  assert os.path.getsize(os.path.join(workdir, 'test_attention.npz')) > 0
  assert os.path.getsize(os.path.join(workdir, 'report.html')) > 0
  # Distinctiveness: recomputed here from the captions and the synthetic set's training captions.
  data = json.loads(open(os.path.join(shared_dirs[0], 'dataset.json')).read())
  seen = {tuple(s['tokens']) for item in data['images'] if item['split'] == 'train' for s in item['sentences']}
  hyps = [tuple(c['caption']) for c in captions]
  assert saved['test_copied_fraction'] == pytest.approx(np.mean([h in seen for h in hyps]))
  assert saved['test_distinct_captions'] == len(set(hyps))
  assert saved['test_vocab_used'] == len({w for h in hyps for w in h})
  by_class = {}
  for c in captions:
    by_class.setdefault(c['class'], []).append(c['cider'])
  assert saved['test_cider_per_class'] == pytest.approx({k: np.mean(v) for k, v in by_class.items()})

  image = os.path.join(shared_dirs[0], 'images', '0.png')
  capsys.readouterr()
  same_name = tmp_path / 'other' / '0.png'  # another image with the same file name
  same_name.parent.mkdir()
  shutil.copy(image, same_name)
  code = cli.caption(workdir, [image, str(tmp_path / 'missing.jpg'), str(same_name)])
  out, err = capsys.readouterr()
  assert code == 2  # one image failed (bad input): exit 2 at the end, the others still captioned
  assert out.startswith(f'{image}: ')
  assert err.count('\n') == 1 and 'missing.jpg' in err
  maps = [os.path.join(workdir, 'captions', n) for n in ('0.png', '0-2.png')]
  assert all(os.path.exists(m) for m in maps) and f'attention map: {maps[1]}' in out


@pytest.mark.slow
def test_fine_tuned_encoder_head_starts_from_imagenet_and_trains(tmp_path, shared_dirs):
  config = smoke(captioner_config, shared_dirs, **{'model.encoder_head_dim': 1280, 'num_epochs': 1})
  workdir = str(tmp_path / 'head')
  results = train.train_and_evaluate(config, workdir)
  assert np.isfinite(results['test_cider'])
  # The cache holds the encoder's last block (320 channels), in its own folder beside the head features'.
  (folder,) = [f for f in os.listdir(shared_dirs[1]) if f.startswith('efficientnet_lite0-64px-before_head-')]
  (store,) = [f for f in os.listdir(os.path.join(shared_dirs[1], folder)) if f.startswith('store-')]
  assert np.load(os.path.join(shared_dirs[1], folder, store), mmap_mode='r').shape[1:] == (4, 320)
  # The head started from the ImageNet head (BatchNorm folded in) and training moved it, a little.
  _, encoder_variables = encoders.load_encoder('efficientnet_lite0', None)
  imagenet = encoders.head_as_dense(jax.tree.map(np.asarray, encoder_variables))
  _, params = final_params(workdir)
  trained = np.asarray(params['encoder_head']['kernel'])
  assert trained.shape == imagenet['kernel'].shape == (320, 1280)
  change = np.abs(trained - imagenet['kernel']).max()
  assert 0 < change < 0.05 * np.abs(imagenet['kernel']).max()
  # The caption command encodes new images up to the same layer and applies the trained head.
  image = os.path.join(shared_dirs[0], 'images', '0.png')
  words, _ = inference.Captioner(workdir).caption(image)
  assert isinstance(words, list)
  with pytest.raises(UserError, match='encoder_head_dim=512 fine-tunes the head of an EfficientNet-Lite'):
    train.train_and_evaluate(override(config, **{'model.encoder_head_dim': 512}), str(tmp_path / 'bad'))


@pytest.mark.slow
def test_plain_captioner_resume_equals_uninterrupted(tmp_path, shared_dirs):
  full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
  train.train_and_evaluate(smoke(captioner_config, shared_dirs), full)
  train.train_and_evaluate(smoke(captioner_config, shared_dirs, num_epochs=1), part)
  train.train_and_evaluate(smoke(captioner_config, shared_dirs), part)
  a = checkpoint.Checkpointer(os.path.join(full, 'checkpoints'), 3)
  b = checkpoint.Checkpointer(os.path.join(part, 'checkpoints'), 3)
  assert a.latest_step() == b.latest_step()
  params_a, params_b = a.restore_params(a.latest_step()), b.restore_params(b.latest_step())
  for x, y in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert strip_timing(read_jsonl(os.path.join(full, 'metrics.jsonl'))) == strip_timing(
    read_jsonl(os.path.join(part, 'metrics.jsonl'))
  )
  assert json.loads(open(os.path.join(full, 'test_captions.json')).read()) == json.loads(
    open(os.path.join(part, 'test_captions.json')).read()
  )
  # The finished run again, its test decoding chosen on val: only re-decodes (no training).
  history = read_jsonl(os.path.join(full, 'metrics.jsonl'))
  choose = {'decoding.val_beam_sizes': (1, 2), 'decoding.val_length_penalties': (0.0, 1.0)}
  results = train.train_and_evaluate(smoke(captioner_config, shared_dirs, **choose), full)
  assert read_jsonl(os.path.join(full, 'metrics.jsonl')) == history
  tried = results['decoding']['chosen_on_val_from']
  assert [(t['beam_size'], t['length_penalty']) for t in tried] == [(1, 0.0), (2, 0.0), (2, 1.0)]
  best = max(tried, key=lambda t: t['val_bleu4'])
  assert (results['decoding']['beam_size'], results['decoding']['length_penalty']) == (
    best['beam_size'],
    best['length_penalty'],
  )


@pytest.mark.slow
def test_attention_captioner_sigkill_then_resume_equals_uninterrupted(tmp_path, shared_dirs):
  synthetic_dir, cache_dir = shared_dirs
  args = [
    '--config=configs/captioner_attention.py:smoke',
    f'--config.data.synthetic_dir={synthetic_dir}',
    f'--config.encoder.cache_dir={cache_dir}',
    '--config.data.synthetic_num_images=30',
    '--config.checkpoint.every_steps=3',
    '--config.num_epochs=3',
  ]
  killed, clean = str(tmp_path / 'killed'), str(tmp_path / 'clean')
  steps = kill_after_checkpoint(args, killed, min_step=6)
  resumed = run_launch(*args, f'--workdir={killed}')
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f'resuming from step {steps[-1]}' in resumed.stderr
  assert run_launch(*args, f'--workdir={clean}').returncode == 0
  a = checkpoint.Checkpointer(os.path.join(killed, 'checkpoints'), 3)
  b = checkpoint.Checkpointer(os.path.join(clean, 'checkpoints'), 3)
  assert steps[-1] < a.latest_step() == b.latest_step()
  for x, y in zip(
    jax.tree.leaves(a.restore_params(a.latest_step())), jax.tree.leaves(b.restore_params(b.latest_step()))
  ):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert strip_timing(read_jsonl(os.path.join(killed, 'metrics.jsonl'))) == strip_timing(
    read_jsonl(os.path.join(clean, 'metrics.jsonl'))
  )


@pytest.mark.slow
def test_ensemble_of_two_seeds_chooses_decoding_on_val_and_scores_test(tmp_path, shared_dirs):

  # Two members of one architecture and vocabulary (the synthetic data follow config.seed, so the members
  # differ in their training length instead of their seed).
  runs = [str(tmp_path / f'member{i}') for i in (0, 1)]
  for epochs, workdir in zip((2, 1), runs):
    train.train_and_evaluate(smoke(captioner_config, shared_dirs, num_epochs=epochs), workdir)
  out = str(tmp_path / 'ens')
  done = run_module('cnn_caption.inference', *runs, f'--out={out}', '--val_beam_sizes=1,2')
  assert done.returncode == 0, done.stderr[-2000:]
  results = json.load(open(os.path.join(out, 'results.json')))
  assert json.loads(done.stdout)['decoding'] == results['decoding']
  assert results['ensemble_of'] == [os.path.abspath(r) for r in runs]
  tried = results['decoding']['chosen_on_val_from']
  assert [t['beam_size'] for t in tried] == [1, 2]
  assert results['decoding']['beam_size'] == max(tried, key=lambda t: t['val_bleu4'])['beam_size']
  for key in ('test_bleu1', 'test_bleu4', 'test_rouge_l', 'test_cider'):
    assert 0.0 <= results[key] <= 10.0
  captions = json.load(open(os.path.join(out, 'test_captions.json')))
  assert len(captions) == results['num_images']['test'] and {'cider', 'rouge_l'} <= set(captions[0])
  # Bad input: one line, exit code 2, nothing written.
  failed = run_module('cnn_caption.inference', *runs, f'--out={tmp_path / "bad"}', '--val_beam_sizes=0')
  assert failed.returncode == 2 and failed.stderr.strip().splitlines() == [
    'error: --val_beam_sizes=0 must list beam sizes >= 1, e.g. 1,3,5'
  ], failed.stderr[-2000:]
  assert not os.path.exists(tmp_path / 'bad')


def test_ensemble_inputs_are_checked_before_anything_is_loaded(tmp_path):
  runs = [str(tmp_path / 'member0'), str(tmp_path / 'member1')]
  with pytest.raises(UserError, match='at least 2 workdirs, got 1'):
    inference.ensemble_results(runs[:1], str(tmp_path / 'one'))
  with pytest.raises(UserError, match='named twice'):
    inference.ensemble_results([runs[0], runs[0] + '/'], str(tmp_path / 'same'))
  with pytest.raises(UserError, match='comma-separated numbers'):
    inference.decoding_choices(['1', 'x'], ['1.0'])
  with pytest.raises(UserError, match='beam sizes >= 1'):
    inference.decoding_choices(['0'], ['1.0'])
  assert inference.decoding_choices(['1', '3'], ['0.5', '1']) == ((1, 3), (0.5, 1.0))
  with pytest.raises(UserError, match='not found: --workdir must be a captioning training workdir'):
    inference.load_trained(runs[0])
  assert not any(os.path.exists(tmp_path / d) for d in ('one', 'same'))
