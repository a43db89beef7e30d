"""Clinical tables to model inputs: BALNMP's encoding and the five ALN label tasks.

BALNMP (bupt-ai-cz/BALNMP, METHODS.md 2(a')) feeds 5 clinical features: age and tumour size
z-scored, and ER, PR, HER2 as "is negative" flags (1 = negative). Here the statistics of the
z-scores come from the training split by default; `stats='all'` uses every patient, as
BALNMP's released tables appear to. The other BCNB fields are available by name:
categorical ones (tumour type, HER2 expression, histological grade, molecular subtype) are
one-hot over the training split's categories (an unseen category is all zeros), numeric
ones (Ki67) z-scored. Column names are options: BCNB's own headers are the defaults below
(as public scripts that read its patient-clinical-data.xlsx name them; one report counts
Ki67 as positive/negative, in which case ki67 needs spec={'ki67': ('negative', 'Ki67')}).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

# feature -> (kind, default column name in BCNB's patient-clinical-data.xlsx).
FEATURES = {
    "age": ("numeric", "Age(years)"),
    "tumour_size": ("numeric", "Tumour Size(cm)"),
    "er_negative": ("negative", "ER"),
    "pr_negative": ("negative", "PR"),
    "her2_negative": ("negative", "HER2"),
    "ki67": ("numeric", "Ki67"),
    "tumour_type": ("category", "Tumour Type"),
    "her2_expression": ("category", "HER2 Expression"),
    "histological_grade": ("category", "Histological grading"),
    "molecular_subtype": ("category", "Molecular subtype"),
}
BALNMP_FEATURES = ("age", "tumour_size", "er_negative", "pr_negative", "her2_negative")
ALN_COLUMN = "ALN status"
ALN_CLASSES = ("N0", "N+(1-2)", "N+(>2)")
# task -> {ALN class: label}; a class missing from a task's map is not in that task.
TASKS = {
    0: {"N0": 0, "N+(1-2)": 1, "N+(>2)": 1},   # N0 vs N+(>0)
    1: {"N+(1-2)": 0, "N+(>2)": 1},            # N+(1-2) vs N+(>2)
    2: {"N0": 0, "N+(1-2)": 1, "N+(>2)": 2},   # three classes
    3: {"N0": 0, "N+(1-2)": 1},                # N0 vs N+(1-2)
    4: {"N0": 0, "N+(>2)": 1},                 # N0 vs N+(>2)
}


class ClinicalError(ValueError):
  """A clinical table that does not fit the configured features (names row and column)."""


def aln_label(status: str, task: int) -> int | None:
  """The label of an ALN status ('N0', 'N+(1-2)', 'N+(>2)') in a BALNMP task, or None when
  the task leaves that status out."""
  if task not in TASKS:
    raise ValueError(f"ALN task {task}; valid: {sorted(TASKS)}")
  key = str(status).strip().replace(" ", "")
  if key not in ALN_CLASSES:
    raise ClinicalError(f"ALN status {status!r}; valid: {list(ALN_CLASSES)}")
  return TASKS[task].get(key)


MISSING_VALUES = ("", "nan", "na", "n/a", "none", "unknown", "?")
MISSING_POLICIES = ("error", "mean_flag")


def is_missing(value) -> bool:
  """Whether a table cell counts as missing (MISSING_VALUES, any case)."""
  return value is None or str(value).strip().lower() in MISSING_VALUES


def _number(row: Mapping, column: str, where: str, *, allow_missing: bool = False
            ) -> float | None:
  """The number in `row[column]` (a trailing % is dropped); None when it is missing and
  that is allowed; anything else non-numeric is an error naming `where` and the column."""
  value = row.get(column)
  if allow_missing and is_missing(value):
    return None
  try:
    number = float(str(value).strip().rstrip("%"))
  except (TypeError, ValueError):
    number = float("nan")
  if not math.isfinite(number):
    raise ClinicalError(f"{where}, column {column!r}: {value!r} is not a number")
  return number


def _is_negative(row: Mapping, column: str, where: str) -> float:
  value = str(row.get(column, "")).strip().lower()
  if value in ("negative", "neg", "-", "0"):
    return 1.0
  if value in ("positive", "pos", "+", "1"):
    return 0.0
  raise ClinicalError(f"{where}, column {column!r}: {row.get(column)!r} is neither "
                      "'Negative' nor 'Positive'")


def _category(value) -> str:
  """A categorical value as encoded: stripped; empty is 'unknown'."""
  return str("" if value is None else value).strip() or "unknown"


@dataclasses.dataclass(frozen=True)
class Encoder:
  """Fitted encoding: z-score statistics and categories (from the fitting rows)."""
  features: tuple[str, ...]
  kinds: Mapping[str, str]                        # feature -> numeric | negative | category
  columns: Mapping[str, str]
  stats: Mapping[str, tuple[float, float]]        # numeric feature -> (mean, std)
  categories: Mapping[str, tuple[str, ...]]       # category feature -> categories
  missing: Mapping[str, str] = dataclasses.field(default_factory=dict)  # feature -> policy

  def _flagged(self, f: str) -> bool:
    return self.missing.get(f, "error") == "mean_flag"

  @property
  def names(self) -> list[str]:
    """The name of each output column."""
    out = []
    for f in self.features:
      if self.kinds[f] == "category":
        out += [f"{f}={c}" for c in self.categories[f]]
      else:
        out += [f] + ([f"{f}_missing"] if self._flagged(f) else [])
    return out

  def encode(self, row: Mapping, where: str = "row") -> np.ndarray:
    """One patient's clinical vector, float32 [len(names)]. A missing numeric value under
    the 'mean_flag' policy is the training mean (z = 0) with its `<f>_missing` flag 1."""
    values = []
    for f in self.features:
      kind, column = self.kinds[f], self.columns[f]
      if kind == "numeric":
        mean, std = self.stats[f]
        v = _number(row, column, where, allow_missing=self._flagged(f))
        values.append(0.0 if v is None else (v - mean) / std)
        if self._flagged(f):
          values.append(float(v is None))
      elif kind == "negative":
        values.append(_is_negative(row, column, where))
      else:
        value = _category(row.get(column))
        values += [float(value == c) for c in self.categories[f]]
    return np.asarray(values, np.float32)


def fit_encoder(rows: Sequence[Mapping], *, features: Sequence[str] = BALNMP_FEATURES,
                columns: Mapping[str, str] | None = None,
                spec: Mapping[str, tuple[str, str]] | None = None,
                missing: Mapping[str, str] | None = None,
                fit_rows: Sequence[int] | None = None, wheres: Sequence[str] | None = None,
                where: str = "clinical table") -> Encoder:
  """An Encoder whose statistics and categories come from `rows[i] for i in fit_rows` (the
  training split; None = every row, BALNMP's choice).

  Args:
    rows: one mapping column -> value per patient.
    features: the features, in output order.
    columns: feature -> column name, overriding the spec's.
    spec: feature -> (kind, column) for features beyond (or replacing) BCNB's `FEATURES`,
      e.g. {'sex': ('category', 'sex')}; kinds 'numeric', 'negative', 'category'.
    missing: numeric feature -> 'error' (the default: a missing value is an error naming
      the row) or 'mean_flag' (statistics from the values present; a missing value encodes
      as the mean, plus a `<feature>_missing` column).
    fit_rows: the rows the statistics come from.
    wheres: how errors name each row (default '<where>, row <i>').
    where: the table's name in errors.

  A configured column that the table lacks is an error naming it and the columns it has.
  """
  table = {**FEATURES, **(spec or {})}
  unknown = [f for f in features if f not in table]
  if unknown:
    raise ClinicalError(f"unknown clinical features {unknown}; valid: {sorted(table)} "
                        "(others need spec={feature: (kind, column)})")
  kinds = {f: table[f][0] for f in features}
  bad = {f: k for f, k in kinds.items() if k not in ("numeric", "negative", "category")}
  if bad:
    raise ClinicalError(f"clinical feature kinds {bad}; valid: numeric, negative, category")
  missing = dict(missing or {})
  wrong = {f: p for f, p in missing.items()
           if p not in MISSING_POLICIES or kinds.get(f) != "numeric"}
  if wrong:
    raise ClinicalError(f"missing-value policies {wrong}: each names a numeric feature of "
                        f"{list(features)} and one of {list(MISSING_POLICIES)}")
  columns = {f: (columns or {}).get(f, table[f][1]) for f in features}
  have = set(rows[0]) if rows else set()
  absent = sorted({c for c in columns.values() if c not in have})
  if absent:
    raise ClinicalError(f"{where}: no column(s) {absent}; it has {sorted(have)}")
  index = range(len(rows)) if fit_rows is None else fit_rows
  chosen = [(rows[i], wheres[i] if wheres else f"{where}, row {i}") for i in index]
  stats, categories = {}, {}
  for f in features:
    kind, column = kinds[f], columns[f]
    if kind == "numeric":
      flagged = missing.get(f) == "mean_flag"
      v = [_number(r, column, w, allow_missing=flagged) for r, w in chosen]
      v = np.asarray([x for x in v if x is not None])
      if not len(v):
        raise ClinicalError(f"{where}, column {column!r}: no fitting row has a value, so "
                            f"{f} cannot be standardised")
      stats[f] = (float(v.mean()), float(v.std()) or 1.0)
    elif kind == "category":
      categories[f] = tuple(sorted({_category(r.get(column)) for r, _ in chosen}))
  return Encoder(tuple(features), kinds, columns, stats, categories, missing)
