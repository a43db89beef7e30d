"""Clinical encoding (BALNMP's five features and the other BCNB fields) and the ALN tasks."""
from __future__ import annotations

import numpy as np
import pytest

from medguide_jax.data import clinical


def _rows():
  return [
      {"Age(years)": 40, "Tumour Size(cm)": 2.0, "ER": "Positive", "PR": "Negative",
       "HER2": "Negative", "Ki67": "30%", "Molecular subtype": "Luminal A", "ALN status": "N0"},
      {"Age(years)": 60, "Tumour Size(cm)": 3.0, "ER": "Negative", "PR": "Negative",
       "HER2": "Positive", "Ki67": 10, "Molecular subtype": "HER2(+)", "ALN status": "N+(1-2)"},
      {"Age(years)": 50, "Tumour Size(cm)": 4.0, "ER": "Positive", "PR": "Positive",
       "HER2": "Negative", "Ki67": 20, "Molecular subtype": "Triple negative",
       "ALN status": "N+(>2)"},
  ]


def test_balnmp_features_z_scored_on_the_training_rows_and_negative_flags():
  rows = _rows()
  enc = clinical.fit_encoder(rows, fit_rows=[0, 1])  # the training split: rows 0 and 1
  assert enc.names == list(clinical.BALNMP_FEATURES)
  assert enc.stats["age"] == (50.0, 10.0) and enc.stats["tumour_size"] == (2.5, 0.5)
  np.testing.assert_allclose(enc.encode(rows[2]), [0.0, 3.0, 0.0, 0.0, 1.0])
  np.testing.assert_allclose(enc.encode(rows[0]), [-1.0, -1.0, 0.0, 1.0, 1.0])
  every = clinical.fit_encoder(rows)  # BALNMP's all-patient statistics
  assert every.stats["age"][0] == 50.0
  np.testing.assert_allclose(every.stats["age"][1], np.std([40, 60, 50]))


def test_other_fields_by_name_one_hot_over_training_categories():
  rows = _rows()
  enc = clinical.fit_encoder(rows, features=("ki67", "molecular_subtype"), fit_rows=[0, 1])
  assert enc.names == ["ki67", "molecular_subtype=HER2(+)", "molecular_subtype=Luminal A"]
  np.testing.assert_allclose(enc.encode(rows[1]), [-1.0, 1.0, 0.0])   # Ki67 (30, 10): z -1
  np.testing.assert_allclose(enc.encode(rows[2]), [0.0, 0.0, 0.0])    # unseen subtype


def test_bad_tables_name_the_column_and_the_row():
  rows = _rows()
  with pytest.raises(clinical.ClinicalError, match=r"no column\(s\) \['Age'\]; it has"):
    clinical.fit_encoder(rows, columns={"age": "Age"})
  rows[1]["Age(years)"] = "unknown"
  with pytest.raises(clinical.ClinicalError, match="row 1, column 'Age\\(years\\)': 'unknown'"):
    clinical.fit_encoder(rows)
  enc = clinical.fit_encoder(_rows())
  with pytest.raises(clinical.ClinicalError, match="patient 7, column 'ER': 'Borderline'"):
    enc.encode({**_rows()[0], "ER": "Borderline"}, where="patient 7")
  with pytest.raises(clinical.ClinicalError, match="unknown clinical features \\['bmi'\\]"):
    clinical.fit_encoder(rows, features=("bmi",))


def test_the_five_balnmp_tasks():
  statuses = ["N0", "N+(1-2)", "N+(>2)"]
  table = {t: [clinical.aln_label(s, t) for s in statuses] for t in clinical.TASKS}
  assert table == {0: [0, 1, 1], 1: [None, 0, 1], 2: [0, 1, 2], 3: [0, 1, None],
                   4: [0, None, 1]}
  assert clinical.aln_label("N+ (1-2)", 2) == 1  # spaces as some tables write it
  with pytest.raises(clinical.ClinicalError, match="ALN status 'N3'"):
    clinical.aln_label("N3", 0)


def test_a_spec_adds_features_and_mean_flag_imputes_a_missing_value():
  rows = [{"age": "40", "sex": "male", "site": "back"},
          {"age": "", "sex": "female", "site": ""},
          {"age": "60", "sex": "female", "site": "face"},
          {"age": "nan", "sex": "male", "site": "back"}]
  spec = {"age": ("numeric", "age"), "sex": ("category", "sex"),
          "body_site": ("category", "site")}
  enc = clinical.fit_encoder(rows, features=("age", "sex", "body_site"), spec=spec,
                             missing={"age": "mean_flag"}, fit_rows=[0, 1, 2])
  assert enc.stats["age"] == (50.0, 10.0)  # from the two ages present among the fitting rows
  assert enc.names == ["age", "age_missing", "sex=female", "sex=male", "body_site=back",
                       "body_site=face", "body_site=unknown"]
  np.testing.assert_array_equal(enc.encode(rows[0]), [-1, 0, 0, 1, 1, 0, 0])
  np.testing.assert_array_equal(enc.encode(rows[1]), [0, 1, 1, 0, 0, 0, 1])
  np.testing.assert_array_equal(enc.encode(rows[3]), [0, 1, 0, 1, 1, 0, 0])
  strict = clinical.fit_encoder(rows, features=("age",), spec=spec, fit_rows=[0, 2])
  with pytest.raises(clinical.ClinicalError, match=r"row 1, column 'age': '' is not a number"):
    strict.encode(rows[1], where="row 1")
  with pytest.raises(clinical.ClinicalError, match="missing-value policies"):
    clinical.fit_encoder(rows, features=("sex",), spec=spec, missing={"sex": "mean_flag"})
  with pytest.raises(clinical.ClinicalError, match="spec="):
    clinical.fit_encoder(rows, features=("sex",))
  with pytest.raises(clinical.ClinicalError, match="no fitting row has a value"):
    clinical.fit_encoder(rows, features=("age",), spec=spec, missing={"age": "mean_flag"},
                         fit_rows=[1, 3])
