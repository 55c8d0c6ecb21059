"""Line charts as inline SVG: one polyline per series, points with their values as tooltips."""

from __future__ import annotations

from collections.abc import Sequence
import math

from cnn_caption.report.page import esc
from cnn_caption.report.page import fmt

PALETTE = ('#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#17becf', '#7f7f7f')

Series = Sequence[tuple[float, float]]  # (x, y) points


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
  """About `count` round tick values covering [lo, hi]."""
  if not (math.isfinite(lo) and math.isfinite(hi)):
    return []
  if hi <= lo:
    pad = abs(lo) * 0.05 or 0.5
    lo, hi = lo - pad, hi + pad
  raw = (hi - lo) / max(count - 1, 1)
  magnitude = 10 ** math.floor(math.log10(raw))
  step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
  first = math.floor(lo / step)
  last = math.ceil(hi / step)
  return [float(f'{k * step:.12g}') for k in range(first, max(last, first + 1) + 1)]


def line_chart(
  series: dict[str, Series],
  title: str,
  *,
  xlabel: str = 'epoch',
  width: int = 440,
  height: int = 250,
  dashed: Sequence[str] = (),
) -> str:
  """An <svg> line chart of the named series (non-finite points dropped); '' when no series has a point."""
  clean = {name: [(float(x), float(y)) for x, y in pts if _finite(x) and _finite(y)] for name, pts in series.items()}
  clean = {name: pts for name, pts in clean.items() if pts}
  if not clean:
    return ''
  xs = [x for pts in clean.values() for x, _ in pts]
  ys = [y for pts in clean.values() for _, y in pts]
  yticks = nice_ticks(min(ys), max(ys))
  x_lo, x_hi = min(xs), max(xs)
  if x_hi == x_lo:
    x_lo, x_hi = x_lo - 1, x_hi + 1
  xticks = [t for t in nice_ticks(x_lo, x_hi, 6) if x_lo <= t <= x_hi]
  if all(float(x).is_integer() for x in xs):  # epochs: whole ticks only
    xticks = [t for t in xticks if float(t).is_integer()]
  xticks = xticks or [x_lo, x_hi]
  y_lo, y_hi = yticks[0], yticks[-1]
  legend_rows = len(clean)
  left = 12 + 6 * max(len(fmt(t)) for t in yticks)  # room for the longest tick label
  right, top, bottom = 12, 26, 40 + 15 * legend_rows
  plot_w, plot_h = width - left - right, height - top - 40

  def px(x: float) -> float:
    return left + (x - x_lo) / (x_hi - x_lo) * plot_w

  def py(y: float) -> float:
    return top + (1 - (y - y_lo) / (y_hi - y_lo)) * plot_h

  total_h = height - 40 + bottom
  parts = [
    f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{total_h}" '
    f'viewBox="0 0 {width} {total_h}" role="img" aria-label="{esc(title)}" font-size="11" font-family="sans-serif">',
    f'<text x="{width / 2:.1f}" y="15" text-anchor="middle" font-size="13">{esc(title)}</text>',
  ]
  for t in yticks:
    y = py(t)
    parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>')
    parts.append(f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end">{esc(fmt(t))}</text>')
  for t in xticks:
    x = px(t)
    parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" stroke="#555"/>')
    parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{esc(fmt(t))}</text>')
  parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>')
  parts.append(
    f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h + 31}" text-anchor="middle" fill="#555">{esc(xlabel)}</text>'
  )
  for i, (name, pts) in enumerate(clean.items()):
    color = PALETTE[i % len(PALETTE)]
    dash = ' stroke-dasharray="5 3"' if name in dashed else ''
    coords = ' '.join(f'{px(x):.1f},{py(y):.1f}' for x, y in pts)
    parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8"{dash} points="{coords}"/>')
    if len(pts) <= 60:
      for x, y in pts:
        parts.append(
          f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.6" fill="{color}">'
          f'<title>{esc(name)}: {esc(fmt(y))} at {esc(xlabel)} {esc(fmt(x))}</title></circle>'
        )
    ly = top + plot_h + 44 + 15 * i
    parts.append(
      f'<line x1="{left}" x2="{left + 22}" y1="{ly - 4}" y2="{ly - 4}" stroke="{color}" stroke-width="2"{dash}/>'
    )
    parts.append(f'<text x="{left + 28}" y="{ly}">{esc(name)}</text>')
  parts.append('</svg>')
  return ''.join(parts)


def _finite(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
