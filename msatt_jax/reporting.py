"""Result writers shared by the evaluators: atomic CSV/JSON files and a console table."""

import csv
import io
import json
import math
import os
import tempfile
from typing import Any, List, Mapping, Optional, Sequence


def atomic_write_text(path: str, text: str) -> None:
  """Writes `text` to `path` via a temporary file in the same folder and os.replace.

  A reader (or a crash half-way) never sees a partly written file.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


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
  atomic_write_text(path, buf.getvalue())


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
  atomic_write_text(path, json.dumps(_json_safe(obj), indent=2, allow_nan=False) + "\n")


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
