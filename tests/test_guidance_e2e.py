"""The whole guidance experiment, all six stages, from the command line; then exploring it."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import medguide_jax
from medguide_jax import train
from tests import helpers

STAGES = ("inferior", "superior", "guidance", "guided", "guided_plus", "multimodal")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("guidance_smoke")
  proc = helpers.run_main(workdir, helpers.overrides(stages=STAGES, steps=4),
                          config_arg="dataset=synthetic,smoke", timeout=helpers.HANG_GUARD_S)
  return workdir, proc


def test_every_stage_runs_in_dependency_order(smoke_run):
  workdir, proc = smoke_run
  results = json.loads((workdir / "results.json").read_text())
  assert set(results["stages"]) == set(STAGES)
  assert [r["model"] for r in results["table"]] == [
      "inferior", "superior", "guided", "guided_plus", "multimodal"]
  for name in STAGES:
    assert (workdir / name / "results.json").exists()
  assert "| guided_plus |" in proc.stdout  # the table is printed at the end
  assert results["stages"]["guidance"]["checkpoint"] == "last"
  assert np.isfinite(results["stages"]["guidance"]["metrics"]["test/mse"])


def test_frozen_parts_are_exactly_the_loaded_ones(smoke_run):
  workdir, _ = smoke_run
  load = lambda stage: medguide_jax.load_run(workdir, stage).variables
  inferior, guidance, guided_plus = load("inferior"), load("guidance"), load("guided_plus")
  for key in ("params", "batch_stats"):
    helpers.assert_trees_equal(inferior[key]["enc_inferior"], guided_plus[key]["enc_inferior"])
  helpers.assert_trees_equal(guidance["params"]["guidance"], guided_plus["params"]["guidance"])
  # The guided_plus head sees [z_I ; G(z_I)]: twice the encoder's feature width.
  assert guided_plus["params"]["head"]["task_0"]["kernel"].shape[0] == 2 * 8 * 4


def test_load_run_predicts_and_reproduces_the_stage_metrics(smoke_run):
  workdir, _ = smoke_run
  run = medguide_jax.load_run(workdir)
  assert run.stage == "guided_plus"
  batch = next(iter(run.setup.dataset("test", train=False)))
  batch.pop("mask")
  out = run.predict(batch)
  np.testing.assert_allclose(out["probs/DIAG"].sum(-1), 1.0, rtol=1e-5)
  metrics = run.evaluate("test", bootstrap=0)
  stored = json.loads((workdir / "guided_plus" / "results.json").read_text())
  stored = stored["stages"]["guided_plus"]["metrics"]
  assert metrics["mean/balanced_accuracy"] == pytest.approx(
      stored["test/mean/balanced_accuracy"], abs=1e-6)


def test_evaluate_cli_reprints_the_table(smoke_run):
  workdir, _ = smoke_run
  proc = subprocess.run([sys.executable, "-m", "medguide_jax.evaluate", f"--workdir={workdir}",
                         "--stages=inferior,guided_plus"], cwd=helpers.ROOT, capture_output=True,
                        text=True, timeout=helpers.HANG_GUARD_S)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| inferior |" in proc.stdout and "| guided_plus |" in proc.stdout


def test_stage_order_follows_init_from():
  config = helpers.tiny_guidance_config(stages=STAGES)
  order = train.stage_order(config)
  for name in STAGES:
    for dep in filter(None, config.stages[name].init_from.split(",")):
      assert order.index(dep) < order.index(name)
