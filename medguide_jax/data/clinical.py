"""Clinical tables to model inputs: BALNMP's encoding and the five ALN label tasks.

BALNMP (bupt-ai-cz/BALNMP, METHODS.md 2(a')) feeds 5 clinical features: age and tumour size
z-scored, and ER, PR, HER2 as "is negative" flags (1 = negative). Here the statistics of the
z-scores come from the training split by default; `stats='all'` uses every patient, as
BALNMP's released tables appear to. The other BCNB fields are available by name:
categorical ones (tumour type, HER2 expression, histological grade, molecular subtype) are
one-hot over the training split's categories (an unseen category is all zeros), numeric
ones (Ki67) z-scored. Column names are options: BCNB's own headers are the defaults below
(not verified against the release here; a builder passes the ones its table has).
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


def _number(row: Mapping, column: str, where: str) -> float:
  value = row.get(column)
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


@dataclasses.dataclass(frozen=True)
class Encoder:
  """Fitted encoding: z-score statistics and categories (from the fitting rows)."""
  features: tuple[str, ...]
  columns: Mapping[str, str]
  stats: Mapping[str, tuple[float, float]]        # numeric feature -> (mean, std)
  categories: Mapping[str, tuple[str, ...]]       # category feature -> categories

  @property
  def names(self) -> list[str]:
    """The name of each output column."""
    out = []
    for f in self.features:
      out += ([f"{f}={c}" for c in self.categories[f]] if FEATURES[f][0] == "category"
              else [f])
    return out

  def encode(self, row: Mapping, where: str = "row") -> np.ndarray:
    """One patient's clinical vector, float32 [len(names)]."""
    values = []
    for f in self.features:
      kind, column = FEATURES[f][0], self.columns[f]
      if kind == "numeric":
        mean, std = self.stats[f]
        values.append((_number(row, column, where) - mean) / std)
      elif kind == "negative":
        values.append(_is_negative(row, column, where))
      else:
        value = str(row.get(column, "")).strip()
        values += [float(value == c) for c in self.categories[f]]
    return np.asarray(values, np.float32)


def fit_encoder(rows: Sequence[Mapping], *, features: Sequence[str] = BALNMP_FEATURES,
                columns: Mapping[str, str] | None = None, fit_rows: Sequence[int] | None = None,
                where: str = "clinical table") -> Encoder:
  """An Encoder whose statistics and categories come from `rows[i] for i in fit_rows` (the
  training split; None = every row, BALNMP's choice). A configured column that the table
  lacks is an error naming it and the columns it has."""
  unknown = [f for f in features if f not in FEATURES]
  if unknown:
    raise ClinicalError(f"unknown clinical features {unknown}; valid: {sorted(FEATURES)}")
  columns = {f: (columns or {}).get(f, FEATURES[f][1]) for f in features}
  have = set(rows[0]) if rows else set()
  missing = sorted({c for c in columns.values() if c not in have})
  if missing:
    raise ClinicalError(f"{where}: no column(s) {missing}; it has {sorted(have)}")
  chosen = [rows[i] for i in (range(len(rows)) if fit_rows is None else fit_rows)]
  stats, categories = {}, {}
  for f in features:
    kind, column = FEATURES[f][0], columns[f]
    if kind == "numeric":
      v = np.asarray([_number(r, column, f"{where}, row {i}") for i, r in enumerate(chosen)])
      stats[f] = (float(v.mean()), float(v.std()) or 1.0)
    elif kind == "category":
      categories[f] = tuple(sorted({str(r.get(column, "")).strip() for r in chosen}))
  return Encoder(tuple(features), columns, stats, categories)
