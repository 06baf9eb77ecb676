"""The statistics of Table I: summaries over test cases and seeds, and paired comparisons.

A model's value on a test case is the mean over its seeds (every run is evaluated on the same
cases of one split), so comparisons pair cases, the unit that varies most. Summaries give the
mean, the standard deviation over cases of those per-case values and, with several seeds, the
standard deviation over seeds of the per-seed means (both with n - 1). A paired comparison of
model A with reference B takes the per-case differences A - B: their mean, a percentile
bootstrap confidence interval of that mean (scipy.stats.bootstrap, seeded, so a rerun gives the
same interval) and the two-sided Wilcoxon signed-rank p-value of scipy.stats.wilcoxon
(defaults: zero differences dropped; all differences zero gives p = 1, where scipy would return
NaN).
"""

import warnings
from typing import Dict, Optional, Sequence

import numpy as np
from scipy import stats as scipy_stats

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
# 'percentile': defined for every set of differences, all-equal ones included (BCa's
# acceleration is then 0/0), and the interval earlier tables were made with.
BOOTSTRAP_METHOD = "percentile"
CONFIDENCE = 0.95
ALPHA = 0.05


def _std(values: np.ndarray) -> Optional[float]:
  """Sample standard deviation (n - 1); None for fewer than two values."""
  return float(np.std(values, ddof=1)) if values.size > 1 else None


def summarize(per_seed_cases: Sequence[Sequence[float]]) -> Dict[str, object]:
  """Summary of one metric of one model from its (seeds, cases) values.

  Returns mean (over seeds and cases), sd_cases (over cases, of the per-case means over seeds),
  sd_seeds (over seeds, of the per-seed means; None for one seed), per_seed (the per-seed
  means) and n (cases).
  """
  values = np.asarray(per_seed_cases, np.float64)
  if values.ndim != 2 or values.size == 0:
    raise ValueError(f"Expected a (seeds, cases) array of values, got shape {values.shape}.")
  per_seed = values.mean(axis=1)
  return {"mean": float(values.mean()), "sd_cases": _std(values.mean(axis=0)),
          "sd_seeds": _std(per_seed), "per_seed": [float(v) for v in per_seed],
          "n": int(values.shape[1])}


def bootstrap_ci(differences: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED, confidence: float = CONFIDENCE) -> tuple:
  """scipy.stats.bootstrap's BOOTSTRAP_METHOD interval of the mean: `resamples` resamples of
  the cases with replacement, drawn by numpy's default_rng(seed)."""
  d = np.asarray(differences, np.float64)
  if d.size == 1:  # Every resample is the one case (scipy asks for two).
    return float(d[0]), float(d[0])
  result = scipy_stats.bootstrap((d,), np.mean, n_resamples=resamples,
                                 confidence_level=confidence, method=BOOTSTRAP_METHOD,
                                 rng=np.random.default_rng(seed))
  return float(result.confidence_interval.low), float(result.confidence_interval.high)


def wilcoxon_p(differences: Sequence[float]) -> float:
  """Two-sided Wilcoxon signed-rank p-value of scipy.stats.wilcoxon(differences); 1.0 when
  every difference is zero (no evidence of any difference; scipy gives NaN)."""
  d = np.asarray(differences, np.float64)
  if not np.any(d != 0):
    return 1.0
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # scipy's notes on ties and small samples.
    return float(scipy_stats.wilcoxon(d).pvalue)


def smallest_p(n: int) -> float:
  """The smallest two-sided p-value the exact signed-rank test can give with n pairs."""
  return min(1.0, 2.0 / 2.0**n)


def paired(values: Sequence[float], reference: Sequence[float]) -> Dict[str, object]:
  """Paired comparison of per-case values with the reference's (same cases, same order)."""
  a, b = np.asarray(values, np.float64), np.asarray(reference, np.float64)
  if a.shape != b.shape or a.ndim != 1 or a.size == 0:
    raise ValueError(f"Paired values need two equal, non-empty lists; got {a.shape}, {b.shape}.")
  d = a - b
  low, high = bootstrap_ci(d)
  p = wilcoxon_p(d)
  return {"n": int(d.size), "mean_difference": float(d.mean()), "ci_low": low, "ci_high": high,
          "p_value": p, "significant": bool(p < ALPHA)}
