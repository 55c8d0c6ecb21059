"""Training-time image augmentation on host (numpy): random crops of a zero-padded image, horizontal flips."""

from __future__ import annotations

import numpy as np


def random_crop_flip(images_BxHxWxC: np.ndarray, rng: np.random.Generator, *, pad: int, flip: bool) -> np.ndarray:
  """Each image shifted by up to `pad` pixels each way (zeros fill in) and, if `flip`, mirrored with p = 1/2.

  Same dtype and shape in and out; `pad` = 0 and `flip` = False return the images unchanged. The caller
  seeds `rng` from what identifies the batch (seed and step), so a resumed run draws the same crops.
  """
  if pad < 0:
    raise ValueError(f'pad={pad} must be >= 0')
  b, h, w, _ = images_BxHxWxC.shape
  out = images_BxHxWxC
  if pad:
    padded = np.pad(images_BxHxWxC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy = rng.integers(0, 2 * pad + 1, size=b)
    dx = rng.integers(0, 2 * pad + 1, size=b)
    rows = dy[:, None] + np.arange(h)[None]  # BxH
    cols = dx[:, None] + np.arange(w)[None]  # BxW
    out = padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
  if flip:
    mirror = rng.random(b) < 0.5
    out = np.where(mirror[:, None, None, None], out[:, :, ::-1], out)
  return out
