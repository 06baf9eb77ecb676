"""Result writers shared by the evaluators: CSV/JSON files (written atomically through
`data_pipelines.files`), the check of an output folder, and console tables."""

import csv
import io
import json
import math
import os
import tempfile
from typing import Any, List, Mapping, Optional, Sequence

from data_pipelines import files
from data_pipelines.errors import DataError

# The console's score tables: overlap and distance in one, detection rates in another, then
# the lesion-wise scores and lesion counts (all in one would be too wide to read).
METRIC_GROUPS = (("dice", "hd95", "slice_dice"), ("sensitivity", "specificity"),
                 ("lesion_dice", "lesion_hd95"), ("lesions_tp", "lesions_fn", "lesions_fp"))


def _columns(rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]]) -> List[str]:
  if columns is not None:
    return list(columns)
  seen: List[str] = []
  for row in rows:
    seen.extend(k for k in row if k not in seen)
  return seen


def write_csv(path: str, rows: Sequence[Mapping[str, Any]],
              columns: Optional[Sequence[str]] = None) -> None:
  """Writes rows as CSV (header = `columns`, or every key in first-seen order), atomically."""
  columns = _columns(rows, columns)
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="raise", lineterminator="\n")
  writer.writeheader()
  for row in rows:
    # repr-exact floats: the CSV reproduces the computed numbers, not a rounded view.
    writer.writerow({k: (repr(float(v)) if isinstance(v, float) else v) for k, v in row.items()})
  files.atomic_write_text(path, buf.getvalue())


def _json_safe(value: Any) -> Any:
  """numpy scalars/arrays -> Python; NaN/Inf -> None (strict JSON has no NaN)."""
  if isinstance(value, Mapping):
    return {str(k): _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if hasattr(value, "tolist"):  # numpy scalars and arrays
    return _json_safe(value.tolist())
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as indented, strict JSON, atomically."""
  files.atomic_write_text(path, json.dumps(_json_safe(obj), indent=2, allow_nan=False) + "\n")


def format_table(rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None,
                 float_format: str = "{:.4f}") -> str:
  """A plain-text table with aligned columns (floats formatted with `float_format`)."""
  columns = _columns(rows, columns)

  def cell(value: Any) -> str:
    if isinstance(value, float):
      return float_format.format(value)
    return "" if value is None else str(value)

  cells = [[cell(row.get(c)) for c in columns] for row in rows]
  widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
  lines.append("  ".join("-" * w for w in widths))
  lines.extend("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in
                         enumerate(zip(r, widths))) for r in cells)
  return "\n".join(lines)


def format_metric_tables(rows: Sequence[Mapping[str, Any]]) -> str:
  """Score rows ('case' and '<metric>_<region>' keys) as one table per METRIC_GROUPS entry."""
  keys = _columns(rows, None)
  tables = []
  for group in METRIC_GROUPS:
    columns = [k for k in keys if k.rsplit("_", 1)[0] in group]
    if columns:
      tables.append(format_table(rows, ["case"] + columns))
  return "\n\n".join(tables)


def check_writable_folder(path: str) -> None:
  """Creates `path` if needed and fails, naming it, when it is a file or cannot be written:
  before any work, so that a bad output folder costs nothing."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise DataError(f"Output folder {path} is a file, not a folder.")
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    raise DataError(f"Output folder {path} is not writable ({e.strerror or e}).") from e
