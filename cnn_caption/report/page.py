"""The page itself: one self-contained HTML file (inline CSS, inline script, images as data: URLs)."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from typing import Any

import numpy as np
from PIL import Image

# No request can leave the page: every image is a data: URL, every style and script inline.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1280px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.sub { color: #666; margin-top: 0; }
.note { color: #8a5a00; background: #fff7e0; padding: 0.4em 0.7em; border-radius: 4px; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { padding: 3px 8px; border: 1px solid #e3e3e3; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.figs { display: flex; flex-wrap: wrap; gap: 1em; }
.figs figure { margin: 0; }
figcaption { font-size: 0.85em; color: #555; }
details pre { max-height: 30em; overflow: auto; background: #fafafa; padding: 0.6em; border: 1px solid #eee; }
.kv td:first-child { color: #555; }
.gallery { display: flex; flex-wrap: wrap; gap: 0.8em; }
.gallery figure { margin: 0; text-align: center; width: 96px; font-size: 0.8em; }
.gallery img { width: 84px; height: 84px; image-rendering: pixelated; border: 1px solid #ccc; }
"""


def esc(value: Any) -> str:
  return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
  """A number as a reader wants it: integers whole, floats to 4 significant digits; None as a dash."""
  if value is None:
    return '–'
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, (int, np.integer)):
    return f'{int(value):,}'
  if isinstance(value, (float, np.floating)):
    v = float(value)
    if not math.isfinite(v):
      return str(v)
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
      return f'{v:.3e}'
    return f'{v:.4g}' if abs(v) < 100 else f'{v:.1f}'
  return str(value)


def seconds_text(seconds: float | None) -> str:
  if seconds is None:
    return '–'
  seconds = float(seconds)
  if seconds < 120:
    return f'{seconds:.1f} s'
  if seconds < 7200:
    return f'{seconds / 60:.1f} min'
  return f'{seconds / 3600:.2f} h'


def png_data_url(image: np.ndarray) -> str:
  """A data: URL of a uint8 image (HxW grey or HxWx3 RGB) as PNG."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format='PNG', optimize=True)
  return 'data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode('ascii')


def file_data_url(path: str, mime: str = 'image/png') -> str:
  with open(path, 'rb') as f:
    return f'data:{mime};base64,' + base64.b64encode(f.read()).decode('ascii')


def json_script(element_id: str, data: Any) -> str:
  """Data for the inline script, as a JSON <script> block ('</' escaped so the text cannot end the block)."""
  text = json.dumps(data, separators=(',', ':'), allow_nan=False).replace('</', '<\\/')
  return f'<script type="application/json" id="{esc(element_id)}">{text}</script>'


def table(header: list[str], rows: list[list[Any]], numeric: set[int] | None = None, attrs: str = '') -> str:
  """An HTML table; cells are escaped unless they are `Raw`; columns in `numeric` align right."""
  numeric = numeric or set()

  def cell(tag: str, i: int, value: Any) -> str:
    cls = ' class="num"' if i in numeric else ''
    text = value.html if isinstance(value, Raw) else esc(fmt(value))
    return f'<{tag}{cls}>{text}</{tag}>'

  head = ''.join(cell('th', i, h) for i, h in enumerate(header))
  body = ''.join('<tr>' + ''.join(cell('td', i, v) for i, v in enumerate(r)) + '</tr>' for r in rows)
  return f'<table{attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class Raw:
  """HTML that `table` puts in a cell as it is."""

  def __init__(self, text: str):
    self.html = text


def key_values(pairs: list[tuple[str, Any]]) -> str:
  rows = ''.join(
    f'<tr><td>{esc(k)}</td><td class="num">{v.html if isinstance(v, Raw) else esc(fmt(v))}</td></tr>' for k, v in pairs
  )
  return f'<table class="kv"><tbody>{rows}</tbody></table>'


def details(summary: str, body_html: str, open_: bool = False) -> str:
  return f'<details{" open" if open_ else ""}><summary>{esc(summary)}</summary>{body_html}</details>'


def json_block(obj: Any) -> str:
  return f'<pre>{esc(json.dumps(obj, indent=2, sort_keys=True, default=str))}</pre>'


def document(title: str, body: str, css: str = '', script: str = '') -> str:
  """The whole page."""
  script_html = f'<script>\n{script}\n</script>' if script else ''
  return (
    '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
    f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
    '<meta name="viewport" content="width=device-width, initial-scale=1">'
    f'<title>{esc(title)}</title><style>{_CSS}{css}</style></head>\n'
    f'<body>\n{body}\n{script_html}\n</body></html>\n'
  )
