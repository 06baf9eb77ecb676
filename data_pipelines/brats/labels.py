"""Label conventions: every on-disk convention <-> the project's canonical labels, and regions.

Canonical labels inside the project: 0 background, 1 NCR/NET (necrotic and non-enhancing core),
2 ED (peritumoural edema), 3 ET (enhancing tumour). Conversions happen only at the edges.
"""

from typing import Dict, Optional, Tuple

import numpy as np

from data_pipelines.errors import DataError

BACKGROUND, NCR_NET, EDEMA, ENHANCING = 0, 1, 2, 3
NUM_CLASSES = 4
CLASS_NAMES = ("background", "NCR/NET", "ED", "ET")

# Raw on-disk value -> canonical value.
CONVENTIONS: Dict[str, Dict[int, int]] = {
    # BraTS challenge: 1 NCR/NET, 2 ED, 4 ET.
    "brats": {0: BACKGROUND, 1: NCR_NET, 2: EDEMA, 4: ENHANCING},
    # MSD Task01 dataset.json: 1 edema, 2 non-enhancing tumour, 3 enhancing tumour.
    "msd": {0: BACKGROUND, 1: EDEMA, 2: NCR_NET, 3: ENHANCING},
    # BraTS 2023 (GLI, SSA, MEN, MET, PED; `BraTS-XXX-NNNNN-NNN` cases): 1 NCR/NETC, 2 ED/SNFH,
    # 3 ET; the organisers' metrics code builds ET from 3, TC from 1+3, WT from 1+2+3
    # (https://github.com/rachitsaluja/BraTS-2023-Metrics, metrics.py).
    "brats2023": {0: BACKGROUND, 1: NCR_NET, 2: EDEMA, 3: ENHANCING},
}
# The convention each layout's own files use ('auto' resolves through this).
LAYOUT_CONVENTION = {"brats": "brats", "msd": "msd"}

# The three evaluated regions, built from canonical labels by one table:
# REGION_TABLE[label] = (in ET, in TC, in WT).
REGIONS = ("ET", "TC", "WT")
REGION_TABLE = np.array([
    [False, False, False],  # background
    [False, True, True],  # NCR/NET: tumour core, whole tumour
    [False, False, True],  # ED: whole tumour only
    [True, True, True],  # ET: all three
])


def resolve_convention(convention: str, layout: str) -> str:
  """'auto' -> the layout's own convention; otherwise checks the name."""
  if convention == "auto":
    convention = LAYOUT_CONVENTION[layout]
  if convention not in CONVENTIONS:
    raise ValueError(f"Unknown label convention {convention!r}; choose one of "
                     f"{', '.join(CONVENTIONS)} or 'auto'.")
  return convention


def _lookup(mapping: Dict[int, int]) -> np.ndarray:
  table = np.full(max(mapping) + 1, 255, np.uint8)
  for raw, canonical in mapping.items():
    table[raw] = canonical
  return table


def to_canonical(raw: np.ndarray, convention: str, source: str = "label") -> np.ndarray:
  """Maps raw label values to canonical uint8 labels; unknown values raise naming `source`."""
  mapping = CONVENTIONS[convention]
  raw = np.asarray(raw)
  if raw.dtype.kind == "f":
    if not np.all(np.isfinite(raw)):
      raise DataError(f"{source}: label volume contains NaN or Inf values.")
    rounded = np.rint(raw)
    if not np.array_equal(rounded, raw):
      raise DataError(f"{source}: label volume has non-integer values.")
    raw = rounded
  raw = raw.astype(np.int64)
  values = np.unique(raw)
  unknown = [int(v) for v in values if int(v) not in mapping]
  if unknown:
    raise DataError(f"{source}: label values {unknown} are not in the {convention!r} convention "
                    f"(allowed {sorted(mapping)}).")
  return _lookup(mapping)[raw]


def from_canonical(canonical: np.ndarray, convention: str) -> np.ndarray:
  """Canonical labels -> the convention's raw values (uint8)."""
  inverse = {c: r for r, c in CONVENTIONS[convention].items()}
  return _lookup(inverse)[np.asarray(canonical).astype(np.int64)]


def region_masks(canonical: np.ndarray) -> np.ndarray:
  """Canonical labels (...,) -> boolean masks (..., 3) of ET, TC, WT, in REGIONS order."""
  return REGION_TABLE[np.asarray(canonical).astype(np.int64)]


def t1gd_contrast(t1gd: np.ndarray, canonical: np.ndarray) -> Optional[Tuple[float, float]]:
  """Mean T1gd inside ET and inside NCR/NET, or None when either region is empty.

  In real data ET is hyper-intense on T1gd and NCR/NET hypo-intense: ET mean <= NCR/NET mean
  signals a swapped label convention.
  """
  et, ncr = canonical == ENHANCING, canonical == NCR_NET
  if not et.any() or not ncr.any():
    return None
  return float(t1gd[et].mean()), float(t1gd[ncr].mean())
