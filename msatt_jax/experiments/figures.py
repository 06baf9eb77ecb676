"""The experiment's figures, drawn with PIL (as msatt_jax/visualize.py draws the evaluator's).

`curves_figure`: validation mean Dice against epoch, one line per run. `comparison_figure`: the
paper's Fig. 7 with every model side by side (rows: test slices; columns: the modalities, the
ground truth, then each model's prediction).
"""

import math
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from msatt_jax import visualize

# Distinguishable line colours (the Tableau 10 palette), cycled.
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
_GRID, _AXIS, _TEXT = (225, 225, 225), (60, 60, 60), (0, 0, 0)

Series = Tuple[str, Sequence[float], Sequence[float]]  # (label, x values, y values)


def _font(size: int = 13) -> ImageFont.ImageFont:
  return ImageFont.load_default(size=size)


def _ticks(low: float, high: float, count: int = 6) -> Tuple[List[float], int]:
  """About `count` round tick values covering [low, high], and the decimals that show them."""
  span = max(high - low, 1e-9)
  raw = span / max(count - 1, 1)
  step = 10 ** math.floor(math.log10(raw))
  step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
  first = math.floor(low / step) * step
  ticks = [first + i * step for i in range(int(math.ceil((high - first) / step - 1e-9)) + 1)]
  decimals = next(d for d in range(10) if abs(round(step, d) - step) < 1e-9 * step)
  return ticks, decimals


def _vertical_text(text: str, font: ImageFont.ImageFont) -> Image.Image:
  """`text` rotated to read upwards, on white."""
  box = font.getbbox(text)
  image = Image.new("RGB", (box[2] + 2, box[3] + 2), "white")
  ImageDraw.Draw(image).text((1, 1), text, fill=_TEXT, font=font)
  return image.rotate(90, expand=True)


def curves_figure(series: Sequence[Series], title: str, x_label: str, y_label: str,
                  size: Tuple[int, int] = (960, 540)) -> Image.Image:
  """A line chart with markers, grid and a legend on the right."""
  width, height = size
  font = _font()
  legend_width = 42 + max([int(font.getlength(label)) for label, _, _ in series] + [60]) + 12
  left, right, top, bottom = 72, width - legend_width, 40, height - 52
  xs = [x for _, sx, _ in series for x in sx] or [0.0, 1.0]
  ys = [y for _, _, sy in series for y in sy] or [0.0, 1.0]
  x_ticks, x_decimals = _ticks(0.0, max(max(xs), 1.0))
  y_ticks, y_decimals = _ticks(max(0.0, min(ys) - 0.05),
                               min(1.0, max(ys) + 0.02) if max(ys) <= 1 else max(ys))
  x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
  to_px = lambda x, y: (left + (x - x0) / max(x1 - x0, 1e-9) * (right - left),
                        bottom - (y - y0) / max(y1 - y0, 1e-9) * (bottom - top))

  image = Image.new("RGB", size, "white")
  draw = ImageDraw.Draw(image)
  draw.text(((left + right) / 2, 12), title, fill=_TEXT, font=_font(15), anchor="ma")
  for x in x_ticks:
    px = to_px(x, y0)[0]
    draw.line([(px, top), (px, bottom)], fill=_GRID)
    draw.text((px, bottom + 6), f"{x:.{x_decimals}f}", fill=_TEXT, font=font, anchor="ma")
  for y in y_ticks:
    py = to_px(x0, y)[1]
    draw.line([(left, py), (right, py)], fill=_GRID)
    draw.text((left - 6, py), f"{y:.{y_decimals}f}", fill=_TEXT, font=font, anchor="rm")
  draw.rectangle([left, top, right, bottom], outline=_AXIS)
  draw.text(((left + right) / 2, bottom + 26), x_label, fill=_TEXT, font=font, anchor="ma")
  label = _vertical_text(y_label, font)
  image.paste(label, (6, int((top + bottom - label.height) / 2)))
  for i, (label, sx, sy) in enumerate(series):
    colour = PALETTE[i % len(PALETTE)]
    points = [to_px(x, y) for x, y in zip(sx, sy)]
    if len(points) > 1:
      draw.line(points, fill=colour, width=2)
    for px, py in points:
      draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
    ly = top + 8 + 20 * i
    draw.line([(right + 16, ly), (right + 36, ly)], fill=colour, width=3)
    draw.text((right + 42, ly), label, fill=_TEXT, font=font, anchor="lm")
  return image


def comparison_figure(rows: Sequence[Tuple[str, np.ndarray, np.ndarray, Sequence[np.ndarray]]],
                      modality_names: Sequence[str], model_names: Sequence[str],
                      min_panel: int = 160) -> Image.Image:
  """Fig. 7 with every model: one row per (title, (H,W,M) slice, (H,W) truth, predictions).

  Panels: each modality in grey, then the ground truth and each model's prediction tinted over
  the first modality (visualize.overlay's colours: NCR/NET red, ED green, ET yellow). Slices
  smaller than `min_panel` pixels are enlarged by a whole factor (nearest neighbour).
  """
  font = _font()
  zoom = max(1, math.ceil(min_panel / max(rows[0][1].shape[:2])))
  h, w = (zoom * n for n in rows[0][1].shape[:2])
  captions = list(modality_names) + ["ground truth"] + list(model_names)
  column_width = max(w, max(int(font.getlength(c)) for c in captions) + 8)
  header, title_band = 22, 18
  canvas = Image.new("RGB", (column_width * len(captions), header + len(rows) * (title_band + h)),
                     "white")
  draw = ImageDraw.Draw(canvas)
  for i, caption in enumerate(captions):
    draw.text((i * column_width + column_width / 2, 4), caption, fill=_TEXT, font=font,
              anchor="ma")
  for r, (title, image, truth, predictions) in enumerate(rows):
    y = header + r * (title_band + h)
    draw.text((4, y + 2), title, fill=_TEXT, font=font)
    base = image[..., 0]
    panels = [np.repeat(visualize.to_gray(image[..., m])[..., None], 3, -1)
              for m in range(image.shape[-1])]
    panels += [visualize.overlay(base, truth)] + [visualize.overlay(base, p) for p in predictions]
    for i, panel in enumerate(panels):
      panel = np.repeat(np.repeat(panel, zoom, axis=0), zoom, axis=1)
      canvas.paste(Image.fromarray(panel), (i * column_width + (column_width - w) // 2,
                                            y + title_band))
  return canvas
