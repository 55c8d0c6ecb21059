"""Image decoding for the frozen encoders: any Pillow mode -> RGB -> square -> normalised."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from cnn_caption.errors import UserError

# encoder name -> per-channel (mean, std) on the 0..255 pixel scale; see each encoder's docstring.
_TF_LITE = ((127.0, 127.0, 127.0), (128.0, 128.0, 128.0))  # (pixel - 127) / 128, every EfficientNet-Lite
NORMALIZATION = {
  **{f'efficientnet_lite{v}': _TF_LITE for v in range(3)},
  'resnet18': ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255)),
}

_SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')


def _resize_float(pixels: np.ndarray, size: int) -> np.ndarray:
  channels = [
    Image.fromarray(np.ascontiguousarray(pixels[..., c]), mode='F').resize((size, size), Image.BICUBIC)
    for c in range(pixels.shape[-1])
  ]
  return np.stack([np.asarray(c) for c in channels], axis=-1)


def _to_rgb_array(image: Image.Image, size: int) -> np.ndarray:
  """Any Pillow mode -> float32 size x size x 3 on the 0..255 scale."""
  mode = image.mode
  if mode in _SIXTEEN_BIT_MODES:
    # 16-bit grayscale (also Pillow's 32-bit 'I', which 16-bit PNGs may open as): 0..65535 -> 0..255.
    gray = np.clip(np.asarray(image, dtype=np.float32) / 257.0, 0.0, 255.0)
    if gray.shape != (size, size):
      gray = _resize_float(gray[..., None], size)[..., 0]
    return np.repeat(gray[..., None], 3, axis=-1)
  if mode == 'F':
    raise UserError(
      f'image {image.filename} is floating-point (mode F), whose range is ambiguous; convert it to 8- or 16-bit first'
    )
  if mode == 'P' and 'transparency' in image.info:
    image = image.convert('RGBA')
  if image.mode != 'RGB':
    image = image.convert('RGB')  # drops alpha; L, LA, 1, P, CMYK, YCbCr expand to RGB
  if image.size != (size, size):
    image = image.resize((size, size), Image.BICUBIC)
  return np.asarray(image, dtype=np.float32)


def _check_image_path(path: str) -> None:
  """Raises UserError saying what path is when it is not a readable regular file."""
  if not os.path.lexists(path):
    raise UserError(f'image {path} does not exist; check the path')
  if not os.path.exists(path):
    raise UserError(f'image {path} is a broken symbolic link; point it at an image file')
  if os.path.isdir(path):
    raise UserError(f'image {path} is a directory, not an image file; pass the image files inside it')
  if not os.path.isfile(path):
    raise UserError(f'image {path} is not a regular file (a device, pipe or socket); pass an image file')
  if os.path.getsize(path) == 0:
    raise UserError(f'image {path} is empty (0 bytes); replace or remove it')
  if not os.access(path, os.R_OK):
    raise UserError(f'image {path} is not readable (permission denied); fix its permissions')


def load_image(path: str, size: int, normalization: str = 'efficientnet_lite0') -> np.ndarray:
  """Reads an image file into the encoder's input format.

  Args:
    path: any file Pillow reads (JPEG, PNG, 8/16-bit TIFF; L, I;16, RGBA, P, ... modes).
    size: output height and width; the whole image is resized (bicubic, no crop).
    normalization: encoder name in NORMALIZATION whose (mean, std) to apply.

  Returns:
    float32 (size, size, 3), RGB, (pixel - mean) / std.

  Raises:
    UserError: the file is missing, unreadable or truncated (the message names it).
  """
  if normalization not in NORMALIZATION:
    raise UserError(f'no input normalisation for encoder {normalization!r}; choose one of {sorted(NORMALIZATION)}')
  _check_image_path(path)
  try:
    with Image.open(path) as image:
      image.load()  # decode fully now: a truncated file fails here, not later
      pixels = _to_rgb_array(image, size)
  except UserError:
    raise
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise UserError(f'image {path} cannot be read ({e}); replace or remove it') from None
  mean, std = NORMALIZATION[normalization]
  return ((pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)
