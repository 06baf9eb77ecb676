"""Pictures of segmentations: label overlays and the paper's Fig. 7 layout (inputs, truth,
result)."""

from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines import files

# Canonical label -> RGB: NCR/NET red, ED green, ET yellow (the usual BraTS colours), and a 2024
# label set's fifth class (RC or CC) blue.
LABEL_COLOURS = np.array([[0, 0, 0], [220, 40, 40], [40, 200, 60], [250, 220, 30],
                          [60, 120, 240]], np.uint8)


def to_gray(image: np.ndarray) -> np.ndarray:
  """A float slice -> uint8, scaled by its 1st..99th brain percentiles (robust to outliers)."""
  image = np.asarray(image, np.float32)
  brain = image[image != 0]
  if brain.size == 0:
    return np.zeros(image.shape, np.uint8)
  lo, hi = np.percentile(brain, [1, 99])
  scaled = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)
  return (scaled * 255).astype(np.uint8)


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """(H,W) intensities + (H,W) canonical labels -> (H,W,3) uint8 with tumour labels tinted."""
  gray = np.repeat(to_gray(image)[..., None], 3, axis=-1).astype(np.float32)
  colours = LABEL_COLOURS[np.asarray(labels, np.int64)].astype(np.float32)
  tumour = (np.asarray(labels) > 0)[..., None]
  mixed = np.where(tumour, (1 - alpha) * gray + alpha * colours, gray)
  return mixed.astype(np.uint8)


def case_figure(modalities: np.ndarray, truth: Optional[np.ndarray], prediction: np.ndarray,
                names: Sequence[str], title: str = "") -> Image.Image:
  """One row like the paper's Fig. 7: each modality, then ground truth, then the prediction.

  modalities: (H,W,M) one axial slice; truth, prediction: (H,W) canonical labels.
  """
  panels = [np.repeat(to_gray(modalities[..., m])[..., None], 3, -1)
            for m in range(modalities.shape[-1])]
  captions = list(names)
  base = modalities[..., 0]
  if truth is not None:
    panels.append(overlay(base, truth))
    captions.append("ground truth")
  panels.append(overlay(base, prediction))
  captions.append("prediction")
  h, w = panels[0].shape[:2]
  header = 16 if not title else 32
  canvas = Image.new("RGB", (w * len(panels), h + header), "white")
  draw = ImageDraw.Draw(canvas)
  if title:
    draw.text((4, 2), title, fill="black")
  for i, (panel, caption) in enumerate(zip(panels, captions)):
    canvas.paste(Image.fromarray(panel), (i * w, header))
    draw.text((i * w + 4, header - 14), caption, fill="black")
  return canvas


def save_png(image: Image.Image, path: str) -> None:
  """Writes atomically: a reader never sees a half-written picture."""
  with files.atomic_output(path) as tmp:
    image.save(tmp, format="PNG")


def most_tumour_slice(labels: np.ndarray) -> int:
  """Index of the axial slice (last axis) with the most tumour voxels (the middle if none)."""
  counts = (np.asarray(labels) > 0).sum(axis=(0, 1))
  return int(np.argmax(counts)) if counts.any() else labels.shape[-1] // 2
