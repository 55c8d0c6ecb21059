"""Training-time image augmentation on host (numpy): random crops of a zero-padded image, flips, random erasing."""

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


def random_erase(
  images_BxHxWxC: np.ndarray, rng: np.random.Generator, *, prob: float, area: tuple[float, float] = (0.02, 0.25)
) -> np.ndarray:
  """With probability `prob` per image, one random rectangle set to zero (Zhong et al. 2020, "Random Erasing").

  The rectangle covers a fraction in `area` of the image, with aspect ratio (height / width) log-uniform in
  [1/3, 3], clipped to the image. Same dtype and shape in and out; `prob` = 0 returns the images unchanged.
  The caller seeds `rng` from what identifies the batch (seed and step), so a resumed run erases the same pixels.
  """
  if not 0 <= prob <= 1:
    raise ValueError(f'prob={prob} must be in [0, 1]')
  if prob == 0:
    return images_BxHxWxC
  b, h, w, _ = images_BxHxWxC.shape
  erase = rng.random(b) < prob
  frac = rng.uniform(*area, size=b)
  aspect = np.exp(rng.uniform(np.log(1 / 3), np.log(3), size=b))
  eh = np.clip(np.round(np.sqrt(frac * h * w * aspect)), 1, h).astype(int)
  ew = np.clip(np.round(np.sqrt(frac * h * w / aspect)), 1, w).astype(int)
  top = (rng.random(b) * (h - eh + 1)).astype(int)
  left = (rng.random(b) * (w - ew + 1)).astype(int)
  rows, cols = np.arange(h)[None], np.arange(w)[None]  # 1xH, 1xW
  in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])  # BxH
  in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])  # BxW
  mask_BxHxW = erase[:, None, None] & in_rows[:, :, None] & in_cols[:, None, :]
  return np.where(mask_BxHxW[..., None], np.zeros((), images_BxHxWxC.dtype), images_BxHxWxC)
