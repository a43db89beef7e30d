"""The paired evaluator: this stage − another on the same cases, with a paired bootstrap."""
from __future__ import annotations

import os

import numpy as np
import pytest

from medguide_jax.evaluation import evaluators
from medguide_jax.evaluation import paired


class _AccuracyTask:
  """A task whose evaluate is accuracy and mean probability of the true class."""
  label_key = "label"

  def evaluate(self, outputs, *, bootstrap, seed):
    del bootstrap, seed
    probs, y = outputs["probs"], outputs["label"]
    return {"accuracy": float(np.mean(probs.argmax(-1) == y)),
            "p_true": float(np.mean(probs[np.arange(len(y)), y])),
            "accuracy_ci95": [0.0, 1.0], "note": "not a scalar"}

  def metric_keys(self):
    return {"accuracy", "p_true"}


def _outputs(rng, n, skill):
  y = rng.integers(0, 3, n)
  logits = rng.normal(size=(n, 3))
  logits[np.arange(n), y] += skill
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  return {"probs": probs, "label": y}


def _ctx(task, stage_dir, outputs, bootstrap=200, seed=3):
  return evaluators.EvalContext(task=task, split="test", outputs=outputs, variables={},
                                predict=None, source=None, stage_dir=str(stage_dir),
                                bootstrap=bootstrap, seed=seed)


def test_the_difference_and_its_interval_match_a_numpy_paired_bootstrap(tmp_path):
  rng = np.random.default_rng(0)
  a = _outputs(rng, 300, 1.5)
  b = {"probs": _outputs(rng, 300, 0.5)["probs"], "label": a["label"]}
  task = _AccuracyTask()
  base = evaluators.from_config({"paired": {}}, task)[0]
  assert base(_ctx(task, tmp_path / "other", b)) == {}
  assert os.path.exists(tmp_path / "other" / "outputs_test.npz")
  ev = evaluators.from_config({"paired": {"against": "other"}}, task)[0]
  got = ev(_ctx(task, tmp_path / "mine", a, bootstrap=200, seed=3))

  acc = lambda o, i: np.mean(o["probs"][i].argmax(-1) == o["label"][i])
  everything = np.arange(300)
  assert got["paired/other/accuracy"] == pytest.approx(acc(a, everything) - acc(b, everything))
  r = np.random.default_rng(3)
  diffs = []
  for _ in range(200):
    i = r.integers(0, 300, 300)
    diffs.append(acc(a, i) - acc(b, i))
  lo, hi = np.percentile(diffs, [2.5, 97.5])
  assert got["paired/other/accuracy_ci95"] == pytest.approx([lo, hi])
  assert set(got) == {f"paired/other/{k}{s}" for k in ("accuracy", "p_true")
                      for s in ("", "_ci95")}
  assert set(got) <= ev.prefixed_keys()


def test_the_paired_interval_is_narrower_than_either_models_own():
  """Two models that share the cases' difficulty: the difference is resolved although the
  per-model intervals overlap (why the evaluator exists)."""
  rng = np.random.default_rng(1)
  n = 400
  y = rng.integers(0, 3, n)
  hard = rng.normal(size=(n, 3)) * 2.0              # shared per-case difficulty
  onehot = np.eye(3)[y]
  a = {"probs": np.exp(hard + 1.3 * onehot), "label": y}
  b = {"probs": np.exp(hard + 1.0 * onehot), "label": y}
  task = _AccuracyTask()
  diff = paired.paired_difference(lambda o: task.evaluate(o, bootstrap=0, seed=0), a, b,
                                  bootstrap=500, seed=0, keys=("accuracy",))
  width = diff["accuracy_ci95"][1] - diff["accuracy_ci95"][0]
  own = [np.percentile([np.mean(o["probs"][i].argmax(-1) == y[i]) for i in
                        (np.random.default_rng(s).integers(0, n, n) for s in range(300))],
                       [2.5, 97.5]) for o in (a, b)]
  assert width < 0.5 * min(hi - lo for lo, hi in own)
  assert diff["accuracy_ci95"][0] > 0


def test_identical_outputs_give_zero_with_a_zero_interval():
  rng = np.random.default_rng(2)
  a = _outputs(rng, 50, 1.0)
  task = _AccuracyTask()
  diff = paired.paired_difference(lambda o: task.evaluate(o, bootstrap=0, seed=0), a, dict(a),
                                  bootstrap=50, seed=0)
  assert diff["accuracy"] == 0 and diff["accuracy_ci95"] == [0.0, 0.0]


def test_a_missing_or_mismatched_other_stage_is_an_error_naming_the_file(tmp_path):
  rng = np.random.default_rng(3)
  task = _AccuracyTask()
  a = _outputs(rng, 40, 1.0)
  ev = evaluators.from_config({"paired": {"against": "inferior"}}, task)[0]
  with pytest.raises(FileNotFoundError, match="inferior/outputs_test.npz"):
    ev(_ctx(task, tmp_path / "mine", a))
  paired.save_outputs(str(tmp_path / "inferior" / "outputs_test.npz"),
                      {"probs": a["probs"], "label": (a["label"] + 1) % 3})
  with pytest.raises(ValueError, match="inferior/outputs_test.npz.*'label'.*differ"):
    ev(_ctx(task, tmp_path / "mine", a))
  paired.save_outputs(str(tmp_path / "inferior" / "outputs_test.npz"),
                      {"probs": a["probs"][:30], "label": a["label"][:30]})
  with pytest.raises(ValueError, match="30 examples there, 40 here"):
    ev(_ctx(task, tmp_path / "mine", a))
  with pytest.raises(ValueError, match="evals.paired.*metrics needs against"):
    evaluators.from_config({"paired": {"metrics": "accuracy"}}, task)
  bad = evaluators.from_config({"paired": {"against": "inferior", "metrics": "dice"}}, task)[0]
  paired.save_outputs(str(tmp_path / "inferior" / "outputs_test.npz"), a)
  with pytest.raises(ValueError, match=r"\['dice'\] are not given"):
    bad(_ctx(task, tmp_path / "mine", a))
