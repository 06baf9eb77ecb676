"""Label sets as data: every on-disk convention -> a label set's classes -> its scored regions.

A label set is the classes a model outputs and the regions they are scored as. Its classes 0..3
mean the same in every set (0 background, 1 NCR/NET (NETC), 2 ED (SNFH), 3 ET), so rules written
for ET/TC/WT hold for all; a 2024 set adds a fifth class 4 (RC for adult glioma after treatment,
CC for paediatric tumours) and regions of its own. A convention maps the raw values of files to
one label set's classes. Conversions happen only at the edges; inside the project labels are
classes of a label set ("canonical").
"""

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from data_pipelines.errors import DataError

BACKGROUND, NCR_NET, EDEMA, ENHANCING = 0, 1, 2, 3
EXTRA = 4  # The fifth class of a 2024 label set: RC (glioma_rc) or CC (ped).


@dataclasses.dataclass(frozen=True)
class LabelSet:
  """Classes a model outputs (index = class) and the regions scored (name -> classes)."""
  name: str
  classes: Tuple[str, ...]
  regions: Tuple[Tuple[str, Tuple[int, ...]], ...]  # ET, TC, WT first, in every set.
  source: str

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  @property
  def region_names(self) -> Tuple[str, ...]:
    return tuple(name for name, _ in self.regions)

  def region_table(self) -> np.ndarray:
    """(classes, regions) bool: table[c, r] when class c belongs to region r."""
    table = np.zeros((self.num_classes, len(self.regions)), bool)
    for r, (_, members) in enumerate(self.regions):
      table[list(members), r] = True
    return table

  def region_classes(self, region: str) -> Tuple[int, ...]:
    return dict(self.regions)[region]

  def classes_of(self, name: str) -> Optional[Tuple[int, ...]]:
    """The classes of the region called `name`, else of the (non-background) class called so;
    None for neither. Lets a scorer name a single tissue (e.g. NETC) the set has no region
    for."""
    if name in self.region_names:
      return self.region_classes(name)
    if name in self.classes[1:]:
      return (self.classes.index(name),)
    return None


_SOURCE_2018 = ("BraTS 2018-2021: Menze et al., IEEE TMI 34(10) 2015, and Baid et al., "
                "arXiv:2107.02314 (ET, TC = NCR + ET, WT = all)")
LABEL_SETS: Dict[str, LabelSet] = {s.name: s for s in (
    LabelSet("glioma", ("background", "NCR/NET", "ED", "ET"),
             (("ET", (3,)), ("TC", (1, 3)), ("WT", (1, 2, 3))), _SOURCE_2018),
    # BraTS 2024 adult glioma, post-treatment: NETC, SNFH, ET and the resection cavity, scored
    # as its own region (de Verdier et al., arXiv:2405.18368).
    LabelSet("glioma_rc", ("background", "NETC", "SNFH", "ET", "RC"),
             (("ET", (3,)), ("TC", (1, 3)), ("WT", (1, 2, 3)), ("RC", (4,))),
             "BraTS 2024 GLI post-treatment, arXiv:2405.18368"),
    # BraTS-PEDs 2024: ET, NET, CC (cystic component), ED; TC = ET + NET + CC, WT = all, and each
    # of NET, CC, ED on its own (Kazerooni et al., arXiv:2404.15009).
    LabelSet("ped", ("background", "NET", "ED", "ET", "CC"),
             (("ET", (3,)), ("TC", (1, 3, 4)), ("WT", (1, 2, 3, 4)), ("NET", (1,)),
              ("CC", (4,)), ("ED", (2,))),
             "BraTS-PEDs 2024, arXiv:2404.15009"),
)}
DEFAULT_LABEL_SET = "glioma"
# The glioma set's, under the names the code has always used.
NUM_CLASSES = LABEL_SETS[DEFAULT_LABEL_SET].num_classes
CLASS_NAMES = LABEL_SETS[DEFAULT_LABEL_SET].classes
REGIONS = LABEL_SETS[DEFAULT_LABEL_SET].region_names
REGION_TABLE = LABEL_SETS[DEFAULT_LABEL_SET].region_table()


@dataclasses.dataclass(frozen=True)
class Convention:
  """The raw values of one kind of file -> the classes of a label set."""
  name: str
  label_set: str
  values: Dict[int, int]
  source: str


CONVENTION_TABLE: Dict[str, Convention] = {c.name: c for c in (
    # BraTS 2018-2021 challenge folders: 1 NCR/NET, 2 ED, 4 ET.
    Convention("brats", "glioma", {0: 0, 1: 1, 2: 2, 4: 3}, _SOURCE_2018),
    # MSD Task01 dataset.json: 1 edema, 2 non-enhancing tumour, 3 enhancing tumour.
    Convention("msd", "glioma", {0: 0, 1: 2, 2: 1, 3: 3},
               "Medical Segmentation Decathlon Task01 dataset.json, arXiv:1902.09063"),
    # BraTS 2023 (GLI, SSA, MEN, MET, PED; `BraTS-XXX-NNNNN-NNN` cases) and 2024 MET: 1 NCR/NETC,
    # 2 ED/SNFH, 3 ET; the organisers' metrics code builds ET from 3, TC from 1+3, WT from
    # 1+2+3 (https://github.com/rachitsaluja/BraTS-2023-Metrics, metrics.py).
    Convention("brats2023", "glioma", {0: 0, 1: 1, 2: 2, 3: 3},
               "BraTS 2023, https://github.com/rachitsaluja/BraTS-2023-Metrics"),
    # BraTS 2024 GLI post-treatment: 1 NETC, 2 SNFH, 3 ET, 4 RC.
    Convention("gli2024", "glioma_rc", {0: 0, 1: 1, 2: 2, 3: 3, 4: 4},
               "BraTS 2024 GLI, arXiv:2405.18368"),
    # BraTS-PEDs 2024: 1 ET, 2 NET, 3 CC, 4 ED.
    Convention("ped2024", "ped", {0: 0, 1: 3, 2: 1, 3: 4, 4: 2},
               "BraTS-PEDs 2024, arXiv:2404.15009"),
)}
# Raw on-disk value -> class, per convention.
CONVENTIONS: Dict[str, Dict[int, int]] = {n: c.values for n, c in CONVENTION_TABLE.items()}


def label_set(name: str = DEFAULT_LABEL_SET) -> LabelSet:
  """The label set called `name` (or the label set of the convention called `name`)."""
  if name in CONVENTION_TABLE:
    name = CONVENTION_TABLE[name].label_set
  if name not in LABEL_SETS:
    raise ValueError(f"Unknown label set {name!r}; choose one of {', '.join(LABEL_SETS)}.")
  return LABEL_SETS[name]


def label_set_of(convention: Optional[str]) -> LabelSet:
  """The label set a model trained on data of this convention outputs. 'auto' (or None) is
  the glioma set: the conventions a layout decides on its own are all of that set, a 2024 one
  is always chosen explicitly (layouts.py)."""
  if convention in (None, "auto"):
    return LABEL_SETS[DEFAULT_LABEL_SET]
  check_convention(convention)
  return label_set(convention)


def label_set_with_regions(count: int) -> LabelSet:
  """The label set scoring `count` regions (each set's count differs; a test keeps it so)."""
  found = [s for s in LABEL_SETS.values() if len(s.regions) == count]
  if len(found) != 1:
    raise ValueError(f"No single label set scores {count} regions.")
  return found[0]


def check_convention(convention: str) -> None:
  if convention not in CONVENTIONS:
    raise ValueError(f"Unknown label convention {convention!r}; choose one of "
                     f"{', '.join(CONVENTIONS)} or 'auto'.")


def default_convention(label_set_name: str) -> str:
  """The first convention of a label set: what predictions of its models are written in when
  the input does not say (its own files' convention decides otherwise)."""
  return next(c.name for c in CONVENTION_TABLE.values() if c.label_set == label_set_name)


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
    hint = "".join(f" {_hint(convention, v)}" for v in unknown[:1] if _hint(convention, v))
    raise DataError(f"{source}: label values {unknown} are not in the {convention!r} convention "
                    f"(allowed {sorted(mapping)}).{hint}")
  return _lookup(mapping)[raw]


def _hint(convention: str, value: int) -> str:
  """Which other conventions of the same files' family hold a value, as a hint."""
  others = [c.name for c in CONVENTION_TABLE.values()
            if c.name != convention and value in c.values and c.label_set != "glioma"]
  if convention == "brats2023" and others:
    return (f"Value {value} exists in {', '.join(others)} (BraTS 2024 label sets): set the "
            "label convention explicitly (label_convention / --labels).")
  return ""


def from_canonical(canonical: np.ndarray, convention: str) -> np.ndarray:
  """Canonical labels -> the convention's raw values (uint8); a class the convention lacks
  raises (a model's class that its output files cannot hold)."""
  inverse = {c: r for r, c in CONVENTIONS[convention].items()}
  canonical = np.asarray(canonical).astype(np.int64)
  present = np.unique(canonical)
  missing = [int(c) for c in present if int(c) not in inverse]
  if missing:
    raise ValueError(f"classes {missing} have no value in the {convention!r} convention "
                     f"(it holds {sorted(inverse)}); choose a convention of that label set.")
  return _lookup(inverse)[canonical]


def region_masks(canonical: np.ndarray, label_set_name: str = DEFAULT_LABEL_SET) -> np.ndarray:
  """Canonical labels (...,) -> boolean masks (..., R) of the label set's regions, in order."""
  return _lookup_masks(canonical, label_set(label_set_name).region_table(), label_set_name)


def masks(canonical: np.ndarray, names: Sequence[str],
          label_set_name: str = DEFAULT_LABEL_SET) -> np.ndarray:
  """Canonical labels (...,) -> boolean masks (..., N) of the named regions or classes of the
  label set (LabelSet.classes_of), in order; ValueError for a name it has neither of."""
  chosen = label_set(label_set_name)
  table = np.zeros((chosen.num_classes, len(names)), bool)
  for i, name in enumerate(names):
    members = chosen.classes_of(name)
    if members is None:
      raise ValueError(f"the {label_set_name!r} label set has no region or class {name!r}.")
    table[list(members), i] = True
  return _lookup_masks(canonical, table, label_set_name)


def _lookup_masks(canonical: np.ndarray, table: np.ndarray, label_set_name: str) -> np.ndarray:
  canonical = np.asarray(canonical).astype(np.int64)
  if canonical.size and canonical.max() >= len(table):
    raise ValueError(f"class {int(canonical.max())} is not in the {label_set_name!r} label set "
                     f"({', '.join(label_set(label_set_name).classes)}).")
  return table[canonical]


def check_regions(regions: Sequence[str], label_set_name: str, what: str) -> None:
  """ValueError naming `what` when it asks for a region the label set lacks."""
  have = label_set(label_set_name).region_names
  missing = [r for r in regions if r not in have]
  if missing:
    raise ValueError(f"{what} needs region(s) {', '.join(missing)}, which the "
                     f"{label_set_name!r} label set lacks (it has {', '.join(have)}).")


def t1gd_contrast(t1gd: np.ndarray, canonical: np.ndarray) -> Optional[Tuple[float, float]]:
  """Mean T1gd inside ET and inside NCR/NET, or None when either region is empty.

  In real data ET is hyper-intense on T1gd and NCR/NET hypo-intense: ET mean <= NCR/NET mean
  signals a swapped label convention.
  """
  et, ncr = canonical == ENHANCING, canonical == NCR_NET
  if not et.any() or not ncr.any():
    return None
  return float(t1gd[et].mean()), float(t1gd[ncr].mean())
