"""Where a run's figures go: TensorBoard event files and a metrics.jsonl log in the workdir.

Kept behind this small interface so the backend can change without touching the trainer.
"""

import json
import os
from typing import Any, Callable, Dict, Mapping

import numpy as np
import tensorflow as tf

from data_pipelines import files


def _scalar(value: Any) -> float:
  return float(np.asarray(value))


def _drop_rows_after(path: str, step: int) -> None:
  """A resumed run replays the steps after its checkpoint: their old rows go, so every step
  appears once. The file is rewritten atomically."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
  if len(kept) != len(lines):
    files.atomic_write_text(path, "".join(kept))


class MetricWriter:
  """Scalars to TensorBoard and metrics.jsonl; images to TensorBoard."""

  def __init__(self, workdir: str, start_step: int = 0):
    os.makedirs(workdir, exist_ok=True)
    self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
    path = os.path.join(workdir, "metrics.jsonl")
    _drop_rows_after(path, start_step)
    self._jsonl = open(path, "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    values = {k: _scalar(v) for k, v in scalars.items()}
    with self._tb.as_default():
      for name, value in values.items():
        tf.summary.scalar(name, value, step=step)
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    self._jsonl.flush()

  def write_images(self, step: int, images: Dict[str, np.ndarray]) -> None:
    """images: name -> uint8 (N,H,W,3)."""
    with self._tb.as_default():
      for name, batch in images.items():
        tf.summary.image(name, batch, step=step, max_outputs=len(batch))

  def flush(self) -> None:
    self._tb.flush()
    self._jsonl.flush()

  def close(self) -> None:
    self._tb.close()
    self._jsonl.close()


class Discard:
  """Stands in for a writer on processes other than the first: one copy of the logs."""

  def __getattr__(self, name: str) -> Callable[..., None]:
    return lambda *args, **kwargs: None
