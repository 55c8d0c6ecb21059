"""Image augmentation on host (numpy): crops of a zero-padded image, flips, random erasing, dihedral transforms."""

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


NUM_DIHEDRAL = 8  # the symmetries of a square: 4 rotations, each with or without a mirror


def dihedral(x: np.ndarray, transform: int) -> np.ndarray:
  """One of the 8 symmetries of the square grid in the last-but-one two axes (... x H x W x C).

  transform t in 0..7: a left-right mirror first when t >= 4, then a rotation by (t % 4) * 90 degrees
  counter-clockwise (np.rot90). t = 0 is the identity. Returns a view where numpy can.
  """
  if not 0 <= transform < NUM_DIHEDRAL:
    raise ValueError(f'dihedral transform {transform} must be in [0, {NUM_DIHEDRAL})')
  if transform >= 4:
    x = np.flip(x, axis=-2)
  return np.rot90(x, transform % 4, axes=(-3, -2))


def undo_dihedral(y: np.ndarray, transform: int) -> np.ndarray:
  """The inverse transform: `undo_dihedral(dihedral(x, t), t)` is x exactly."""
  if not 0 <= transform < NUM_DIHEDRAL:
    raise ValueError(f'dihedral transform {transform} must be in [0, {NUM_DIHEDRAL})')
  x = np.rot90(y, -(transform % 4), axes=(-3, -2))
  return np.flip(x, axis=-2) if transform >= 4 else x


def undo_dihedral_regions(regions_xNxC: np.ndarray, transform: int) -> np.ndarray:
  """A transformed image's region features (... x N x C) put back in the original image's orientation.

  The N = S*S regions are a row-major square map; afterwards region (i, j) describes the same place of the
  image in every transform.
  """
  n = regions_xNxC.shape[-2]
  side = int(round(n**0.5))
  if side * side != n:
    raise ValueError(f'{n} regions are not a square map; dihedral transforms need a square feature map')
  grid = regions_xNxC.reshape(*regions_xNxC.shape[:-2], side, side, regions_xNxC.shape[-1])
  return np.ascontiguousarray(undo_dihedral(grid, transform)).reshape(regions_xNxC.shape)


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
