"""A small deterministic captioned-scenes set (Karpathy format) so captioning runs with no data.

Each scene is one or two groups of identical shapes (1-3 shapes in all) on a
plain, striped or checkered grey background. A group has a count (1-3), a
colour (red/green/blue/yellow), a shape (circle/square/triangle) and a position
(left/right/top/bottom/center: the middle row's side cells, the middle
column's top and bottom cells and the middle cell of a 3x3 grid). Captions are
5 of 8 templates filled from the scene, e.g. "there are two red circles on the
left". An image's `class` is its background (plain/striped/checkered), so
class-based baselines run on this set too. Image i depends only on (seed, i),
so sets of different sizes share their first images.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from absl import logging
import numpy as np
from PIL import Image
from PIL import ImageDraw

from cnn_caption.errors import UserError

GENERATOR = 'cnn_caption.data.synthetic/2'  # bump when the output for given parameters changes
CAPTIONS_PER_IMAGE = 5
COLORS = {'red': (220, 40, 40), 'green': (40, 170, 60), 'blue': (40, 70, 220), 'yellow': (235, 215, 40)}
SHAPES = ('circle', 'square', 'triangle')
# position -> (row, column) of its cell in a 3x3 grid.
POSITIONS = {'left': (1, 0), 'right': (1, 2), 'top': (0, 1), 'bottom': (2, 1), 'center': (1, 1)}
_POSITION_PHRASES = {
  'left': 'on the left',
  'right': 'on the right',
  'top': 'at the top',
  'bottom': 'at the bottom',
  'center': 'in the center',
}
BACKGROUNDS = ('plain', 'striped', 'checkered')
_NUMBERS = {1: 'a', 2: 'two', 3: 'three'}
# count -> shape centres (x, y) and size as fractions of a cell.
# Sizes and jitter leave a gap of >= 6 % of a cell between shapes of a group (1 px at 64 px).
_LAYOUTS = {
  1: (((0.5, 0.5),), 0.62),
  2: (((0.25, 0.5), (0.75, 0.5)), 0.38),
  3: (((0.25, 0.24), (0.75, 0.24), (0.5, 0.76)), 0.36),
}
_SIZE_JITTER = (0.92, 1.05)  # factor on a shape's size
_POSITION_JITTER = 0.02  # fraction of a cell
_GROUP_COUNTS = {1: ((1,), (2,), (3,)), 2: ((1, 1), (1, 2), (2, 1))}  # at most 3 shapes per scene
_NUM_TEMPLATES = 8


def _sample_scene(rng: np.random.Generator) -> dict[str, Any]:
  num_groups = 1 if rng.random() < 0.6 else 2
  counts = _GROUP_COUNTS[num_groups][rng.integers(len(_GROUP_COUNTS[num_groups]))]
  positions = rng.choice(list(POSITIONS), size=num_groups, replace=False)
  groups = [
    {'count': int(n), 'color': str(rng.choice(list(COLORS))), 'shape': str(rng.choice(SHAPES)), 'position': str(p)}
    for n, p in zip(counts, positions)
  ]
  return {'background': str(rng.choice(BACKGROUNDS)), 'objects': groups}


def _render(scene: dict[str, Any], size: int, rng: np.random.Generator) -> Image.Image:
  """Draws the scene; `rng` adds small jitter to tones, positions and sizes."""
  base = int(rng.integers(105, 151))
  light, dark = base + 25, base - 25
  period = max(2, size // 28)  # stripe / check width in pixels: 8 at 224 px, 2 at 64 px
  yy, xx = np.mgrid[0:size, 0:size]
  if scene['background'] == 'plain':
    gray = np.full((size, size), base, np.uint8)
  elif scene['background'] == 'striped':
    coord = yy if rng.random() < 0.5 else xx
    gray = np.where((coord // period) % 2 == 0, light, dark).astype(np.uint8)
  else:
    gray = np.where(((yy // period) + (xx // period)) % 2 == 0, light, dark).astype(np.uint8)
  image = Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), 'RGB')
  draw = ImageDraw.Draw(image)
  cell = size / 3
  for group in scene['objects']:
    row, col = POSITIONS[group['position']]
    centres, rel_size = _LAYOUTS[group['count']]
    color = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLORS[group['color']])
    for cx, cy in centres:
      half = 0.5 * rel_size * cell * rng.uniform(*_SIZE_JITTER)
      x = (col + cx + rng.uniform(-_POSITION_JITTER, _POSITION_JITTER)) * cell
      y = (row + cy + rng.uniform(-_POSITION_JITTER, _POSITION_JITTER)) * cell
      box = (x - half, y - half, x + half, y + half)
      if group['shape'] == 'circle':
        draw.ellipse(box, fill=color)
      elif group['shape'] == 'square':
        draw.rectangle(box, fill=color)
      else:
        draw.polygon([(x, y - half), (x - half, y + half), (x + half, y + half)], fill=color)
  return image


# The template words of _caption besides the noun and position phrases.
_TEMPLATE_WORDS = ('there', 'is', 'are', 'and', 'the', 'image', 'shows', 'on', 'a', 'background', 'picture', 'of', 'we')
_TEMPLATE_WORDS += ('can', 'see')


def caption_words() -> frozenset[str]:
  """Every word a synthetic caption can hold: a bound on the vocabulary before any image is made."""
  words = set(_TEMPLATE_WORDS) | set(_NUMBERS.values()) | set(COLORS) | set(BACKGROUNDS)
  words |= set(SHAPES) | {shape + 's' for shape in SHAPES}
  for phrase in _POSITION_PHRASES.values():
    words |= set(phrase.split())
  return frozenset(words)


def _noun_phrase(group: dict[str, Any]) -> str:
  n = group['count']
  return f'{_NUMBERS[n]} {group["color"]} {group["shape"]}{"s" if n > 1 else ""}'


def _caption(scene: dict[str, Any], template: int, rng: np.random.Generator) -> str:
  """One caption of the scene from template number `template`; groups in a random order."""
  groups = [scene['objects'][k] for k in rng.permutation(len(scene['objects']))]
  be = ['is' if g['count'] == 1 else 'are' for g in groups]
  nps = [_noun_phrase(g) for g in groups]
  where = [_POSITION_PHRASES[g['position']] for g in groups]
  located = ' and '.join(f'{n} {w}' for n, w in zip(nps, where))
  background = f'on a {scene["background"]} background'
  if template == 0:
    return f'there {be[0]} {located}'
  if template == 1:
    return located
  if template == 2:
    return ' and '.join(f'{w} there {b} {n}' for n, w, b in zip(nps, where, be))
  if template == 3:
    return f'the image shows {located} {background}'
  if template == 4:
    return f'a picture of {located}'
  if template == 5:
    return ' and '.join(f'{n} {b} {w}' for n, w, b in zip(nps, where, be))
  if template == 6:
    return f'{located} {background}'
  return f'we can see {located}'


def _split_sizes(num_images: int) -> tuple[int, int, int]:
  num_val = max(1, int(0.1 * num_images + 0.5))
  return num_images - 2 * num_val, num_val, num_val


def _params(num_images: int, image_size: int, seed: int) -> dict[str, Any]:
  return {'generator': GENERATOR, 'num_images': num_images, 'image_size': image_size, 'seed': seed}


def _read_params(out_dir: str) -> dict[str, Any] | None:
  """The generator parameters stored in out_dir/dataset.json, or None if there is none."""
  try:
    with open(os.path.join(out_dir, 'dataset.json'), encoding='utf-8') as f:
      data = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(data, dict) or data.get('dataset') != 'synthetic':
    return None
  return data.get('synthetic') if isinstance(data.get('synthetic'), dict) else None


def _is_complete(out_dir: str, params: dict[str, Any]) -> bool:
  if _read_params(out_dir) != params:
    return False
  images = os.path.join(out_dir, 'images')
  return all(os.path.exists(os.path.join(images, f'{i}.png')) for i in range(params['num_images']))


def _write(out_dir: str, params: dict[str, Any]) -> None:
  """Writes the whole set into `out_dir` (a fresh folder): images first, dataset.json last."""
  num_images, size, seed = params['num_images'], params['image_size'], params['seed']
  os.makedirs(os.path.join(out_dir, 'images'))
  num_train, num_val, _ = _split_sizes(num_images)
  entries = []
  for i in range(num_images):
    rng = np.random.default_rng([seed, i])
    scene = _sample_scene(rng)
    image = _render(scene, size, rng)
    image.save(os.path.join(out_dir, 'images', f'{i}.png'), compress_level=1)
    templates = rng.permutation(_NUM_TEMPLATES)[:CAPTIONS_PER_IMAGE]
    sentences = []
    for j, template in enumerate(templates):
      raw = _caption(scene, int(template), rng)
      sentences.append({'tokens': raw.split(), 'raw': raw, 'imgid': i, 'sentid': CAPTIONS_PER_IMAGE * i + j})
    split = 'train' if i < num_train else 'val' if i < num_train + num_val else 'test'
    entries.append(
      {
        'imgid': i,
        'sentids': [s['sentid'] for s in sentences],
        'filename': f'{i}.png',
        'filepath': 'images',
        'split': split,
        'class': scene['background'],
        'sentences': sentences,
        'scene': scene,
      }
    )
  with open(os.path.join(out_dir, 'dataset.json'), 'w', encoding='utf-8') as f:
    json.dump({'dataset': 'synthetic', 'synthetic': params, 'images': entries}, f)


def make_synthetic_dataset(out_dir: str, num_images: int, image_size: int = 224, seed: int = 0) -> str:
  """Writes (once) a synthetic captioned-scenes set in Karpathy format.

  Writes out_dir/dataset.json ("dataset": "synthetic", 80/10/10 % train/val/
  test, 5 captions per image, `filepath` "images") and out_dir/images/<i>.png.
  Does nothing when out_dir already holds a complete set made with the same
  parameters; replaces a synthetic set made with other parameters. The set is
  built in a temporary sibling folder and renamed into place, so out_dir is
  never half-written.

  Args:
    out_dir: destination folder; must be absent, empty or a synthetic set.
    num_images: images in all (>= 3, so that every split has one).
    image_size: side of the square images in pixels (>= 32).
    seed: makes the set; the same arguments give byte-identical files.

  Returns:
    out_dir.
  """
  for name, value, low in (('num_images', num_images, 3), ('image_size', image_size, 32)):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise UserError(f'synthetic data: {name}={value!r} must be an integer >= {low}')
  if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
    raise UserError(f'synthetic data: seed={seed!r} must be an integer >= 0')
  params = _params(num_images, image_size, seed)
  if _is_complete(out_dir, params):
    logging.info('Synthetic captioning set in %s is complete (%d images); reusing it', out_dir, num_images)
    return out_dir
  replace = os.path.exists(out_dir)
  replaceable = os.path.isdir(out_dir) and (not os.listdir(out_dir) or _read_params(out_dir) is not None)
  if replace and not replaceable:
    raise UserError(
      f'{out_dir}: exists and is not a synthetic captioning set; '
      'choose another folder (config.data.synthetic_dir) or remove it'
    )

  parent, base = os.path.split(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{base}.tmp-', dir=parent)
  try:
    logging.info('Writing %d synthetic %dx%d images to %s', num_images, image_size, image_size, out_dir)
    _write(os.path.join(tmp, 'set'), params)
    if replace:
      logging.info('Replacing %s (made with %s)', out_dir, _read_params(out_dir))
      os.rename(out_dir, os.path.join(tmp, 'old'))
    try:
      os.rename(os.path.join(tmp, 'set'), out_dir)
    except OSError:
      if not _is_complete(out_dir, params):  # another process may have just written the same set
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir
