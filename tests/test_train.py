"""The trainer's contracts: resume, sharding, results, errors (in-process, tiny configs)."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from medguide_jax import checkpointing, train
from tests import helpers


def _params_of(workdir, stage="inferior"):
  return checkpointing.load_variables(workdir / stage / "variables")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  results = train.train_and_evaluate(helpers.tiny_guidance_config(steps=7), str(workdir))
  return workdir, results


def test_outputs_follow_the_contract(uninterrupted):
  workdir, results = uninterrupted
  for name in ("config.json", "run.json", "results.json"):
    assert (workdir / name).exists(), name
  stage = results["stages"]["inferior"]
  assert stage["checkpoint"] == "best" and 1 <= stage["step"] <= 7
  assert {"test/mean/balanced_accuracy", "validation/loss", "test/DIAG/auc"} <= set(stage["metrics"])
  row = results["table"][0]
  assert row["model"] == "inferior"
  lo, hi = row["mean/balanced_accuracy_ci95"]
  assert lo <= row["mean/balanced_accuracy"] <= hi
  lines = helpers.metrics_lines(workdir / "inferior" / "metrics.jsonl")
  assert [l["step"] for l in lines] == list(range(1, 8))
  assert all("train/loss" in l for l in lines)
  assert "eval/validation/loss" in lines[1]
  run = json.loads((workdir / "run.json").read_text())
  assert run["device_count"] == 8 and run["process_count"] == 1
  assert run["datasets"][0]["examples"]["test"] == 400


class _Crash(Exception):
  pass


def _crash_after_checkpoint(config, workdir, crash_step=None) -> None:
  """Runs `config` until the checkpoint of `crash_step` (any step if None) is on disk,
  then dies as a killed process would: nothing after that save happens."""
  real_save = checkpointing.Checkpointer.save

  def save_then_crash(self, step, state, data_iter):
    real_save(self, step, state, data_iter)
    if crash_step is None or step == crash_step:
      self.wait()
      raise _Crash()

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(checkpointing.Checkpointer, "save", save_then_crash)
    with pytest.raises(_Crash):
      train.train_and_evaluate(config, str(workdir))


def test_resumed_equals_uninterrupted(uninterrupted, tmp_path):
  """Killed after the checkpoint of step 4, then rerun: bitwise the same end."""
  reference, _ = uninterrupted
  _crash_after_checkpoint(helpers.tiny_guidance_config(steps=7), tmp_path, crash_step=4)
  assert not (tmp_path / "inferior" / "results.json").exists()
  train.train_and_evaluate(helpers.tiny_guidance_config(steps=7), str(tmp_path))
  helpers.assert_trees_equal(_params_of(reference), _params_of(tmp_path))
  assert helpers.metrics_without_timing(reference / "inferior" / "metrics.jsonl") == (
      helpers.metrics_without_timing(tmp_path / "inferior" / "metrics.jsonl"))


def test_config_resume_restores_another_workdirs_checkpoint(uninterrupted, tmp_path):
  crashed = tmp_path / "crashed"
  _crash_after_checkpoint(helpers.tiny_guidance_config(steps=7), crashed, crash_step=4)
  config = helpers.tiny_guidance_config(steps=7)
  config.resume = str(crashed)
  train.train_and_evaluate(config, str(tmp_path / "resumed"))
  helpers.assert_trees_equal(_params_of(uninterrupted[0]), _params_of(tmp_path / "resumed"))


def test_derived_fields_follow_an_overridden_num_steps():
  config = helpers.tiny_guidance_config(steps=7)
  stage = config.stages.inferior
  stage.num_steps, stage.eval_every, stage.log_every, stage.checkpoint_every = 250, -1, -1, -1
  stage.opt.warmup_steps = -1
  resolved = train.resolve_stage(stage)
  assert (resolved.eval_every, resolved.checkpoint_every, resolved.log_every) == (25, 25, 12)
  assert resolved.opt.warmup_steps == 25
  assert stage.eval_every == -1  # the config itself is untouched


def test_corrupt_latest_checkpoint_falls_back(uninterrupted, tmp_path):
  _crash_after_checkpoint(helpers.tiny_guidance_config(steps=7), tmp_path, crash_step=6)
  ckpt_dir = tmp_path / "inferior" / "checkpoints" / "6" / "state"
  victims = [p for p in ckpt_dir.rglob("*") if p.is_file() and p.stat().st_size > 100]
  assert victims
  for p in victims:  # truncate every data file of the newest checkpoint
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
  train.train_and_evaluate(helpers.tiny_guidance_config(steps=7), str(tmp_path))
  helpers.assert_trees_equal(_params_of(uninterrupted[0]), _params_of(tmp_path))
  assert list((tmp_path / "inferior" / "checkpoints_unreadable").iterdir())


def test_finished_stage_is_skipped_and_guarded(uninterrupted):
  workdir, results = uninterrupted
  again = train.train_and_evaluate(helpers.tiny_guidance_config(steps=7), str(workdir))
  assert again["table"] == results["table"]
  changed = helpers.tiny_guidance_config(steps=7)
  changed.stages.inferior.opt.lr = 0.5
  with pytest.raises(train.ConfigError, match="stages.inferior.opt.lr"):
    train.train_and_evaluate(changed, str(workdir))


def test_checkpoint_that_does_not_fit_is_an_error(tmp_path):
  config = helpers.tiny_guidance_config(steps=5)
  config.stages.inferior.checkpoint_every = 1
  _crash_after_checkpoint(config, tmp_path)
  files = lambda: {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
  before = files()
  wider = helpers.tiny_guidance_config(steps=5)
  wider.model.encoder_kwargs.width = 16
  with pytest.raises(checkpointing.CheckpointMismatchError, match="enc_inferior"):
    train.train_and_evaluate(wider, str(tmp_path))
  assert files() == before  # nothing written, nothing touched


def test_batch_size_not_divisible_names_both_numbers(tmp_path):
  config = helpers.tiny_guidance_config(batch=12)
  with pytest.raises(ValueError, match=r"batch_size=12 .*8 devices"):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_non_finite_loss_stops_with_the_step(tmp_path):
  config = helpers.tiny_guidance_config(steps=6)
  config.stages.inferior.select = ""
  config.stages.inferior.checkpoint_every = 1
  config.stages.inferior.opt.name = "sgd"
  config.stages.inferior.opt.lr = 1e36
  with pytest.raises(train.NonFiniteError, match=r"at step \d"):
    train.train_and_evaluate(config, str(tmp_path))
  steps = checkpointing.Checkpointer(tmp_path / "inferior" / "checkpoints").steps()
  lines = helpers.metrics_lines(tmp_path / "inferior" / "metrics.jsonl")
  assert all(np.isfinite(l["train/loss"]) for l in lines if l["step"] in steps)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
  """Two micro-batches of 8 give the update of one batch of 16 (no BN: frozen encoder), on
  the 8-device mesh: each strided micro-batch keeps one row per device."""
  assert jax.device_count() == 8
  outs = []
  for k in (1, 2):
    config = helpers.tiny_guidance_config(stages=("inferior", "guidance"), steps=3)
    config.model.guidance_dropout = 0.0  # micro-batches draw other dropout masks
    config.stages.guidance.init_from = "inferior"  # superior stays random (and frozen)
    config.stages.guidance.opt.accumulate_steps = k
    config.stages.guidance.log_every = 1
    workdir = tmp_path / f"k{k}"
    train.train_and_evaluate(config, str(workdir))
    outs.append(helpers.losses(workdir / "guidance" / "metrics.jsonl"))
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5)


def test_fsdp_sharding_trains_like_replicated(uninterrupted, tmp_path):
  config = helpers.tiny_guidance_config(steps=7)
  config.mesh.fsdp_rules = ".*"
  config.mesh.min_fsdp_size_mb = 0.0
  train.train_and_evaluate(config, str(tmp_path))
  np.testing.assert_allclose(helpers.losses(tmp_path / "inferior" / "metrics.jsonl"),
                             helpers.losses(uninterrupted[0] / "inferior" / "metrics.jsonl"),
                             rtol=1e-5)


def test_fsdp_rules_shard_the_largest_divisible_dimension():
  from medguide_jax import parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh()
  tree = {"enc": {"kernel": jax.ShapeDtypeStruct((3, 3, 5, 64), np.float32),
                  "odd": jax.ShapeDtypeStruct((3, 5), np.float32)},
          "head": {"kernel": jax.ShapeDtypeStruct((64, 16), np.float32)}}
  shardings = parallel.param_shardings(mesh, tree, "enc/.*", min_size_mb=0.0)
  assert shardings["enc"]["kernel"].spec == jax.sharding.PartitionSpec(None, None, None, "data")
  assert shardings["enc"]["odd"].spec == jax.sharding.PartitionSpec()   # nothing divides by 8
  assert shardings["head"]["kernel"].spec == jax.sharding.PartitionSpec()  # rule does not match


def test_bfloat16_compute_keeps_float32_parameters(tmp_path):
  config = helpers.tiny_guidance_config(steps=2)
  config.compute_dtype = "bfloat16"
  train.train_and_evaluate(config, str(tmp_path))
  variables = _params_of(tmp_path)
  assert {x.dtype for x in jax.tree.leaves(variables["params"])} == {np.dtype(np.float32)}
  assert np.all(np.isfinite(helpers.losses(tmp_path / "inferior" / "metrics.jsonl")))


def test_profile_window_writes_a_trace(tmp_path):
  config = helpers.tiny_guidance_config(steps=3)
  config.profile_steps = "1:9"  # runs past the end: closed when the stage ends
  train.train_and_evaluate(config, str(tmp_path))
  assert list((tmp_path / "inferior" / "profile").rglob("*.xplane.pb"))
  config.profile_steps = "1-9"
  with pytest.raises(train.ConfigError, match="profile_steps"):
    train.train_and_evaluate(config, str(tmp_path / "other"))


# --------------------------------------------------------------------------- state slots
def _distill_config(steps: int = 6):
  config = helpers.tiny_guidance_config(stages=("superior",), steps=2)
  config.method = "toy_distill"
  distill = config.stages.superior.to_dict()
  distill.update(task="distill", teacher_from="superior", num_steps=steps, select="",
                 checkpoint_every=1)
  config.stages.distill = distill
  return config


@pytest.fixture
def toy_distill(monkeypatch):
  from medguide_jax import tasks  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(tasks.METHODS, "toy_distill", "tests.toy_distill")


def _preempt_at(monkeypatch, at: int):
  calls = []
  monkeypatch.setattr(train, "_preempted", lambda step: calls.append(step) or step == at)


def test_a_teacher_is_reloaded_on_resume_never_checkpointed_and_checked(tmp_path, toy_distill,
                                                                        monkeypatch):
  from medguide_jax import paths  # pylint: disable=g-import-not-at-top
  train.train_and_evaluate(_distill_config(), str(tmp_path / "whole"))
  with monkeypatch.context() as m:
    _preempt_at(m, 3)
    with pytest.raises(train.Preempted):
      train.train_and_evaluate(_distill_config(), str(tmp_path / "cut"))
  ckpt = checkpointing.Checkpointer(tmp_path / "cut" / "distill" / "checkpoints")
  stored = paths.flatten(ckpt._manager.item_metadata(3)["state"])  # pylint: disable=protected-access
  ckpt.close()
  assert not [k for k in stored if k.startswith("teacher/") or "enc_superior" in k]
  assert any(k.startswith("params/enc_inferior/") for k in stored)
  train.train_and_evaluate(_distill_config(), str(tmp_path / "cut"))
  helpers.assert_trees_equal(_params_of(tmp_path / "whole", "distill"),
                             _params_of(tmp_path / "cut", "distill"))
  kd = lambda w: [l["train/kd"] for l in helpers.metrics_lines(w / "distill" / "metrics.jsonl")]
  assert kd(tmp_path / "whole") == kd(tmp_path / "cut") and kd(tmp_path / "whole")[0] > 0
  record = json.loads((tmp_path / "cut" / "distill" / "teacher.json").read_text())
  assert set(record["sha256"]) == {"superior"}


def test_a_teacher_whose_source_changed_is_refused_on_resume(tmp_path, toy_distill, monkeypatch):
  with monkeypatch.context() as m:
    _preempt_at(m, 3)  # the superior stage has 2 steps: this is the distill stage's
    with pytest.raises(train.Preempted):
      train.train_and_evaluate(_distill_config(), str(tmp_path))
  source = tmp_path / "superior" / "variables"
  variables = checkpointing.load_variables(source)
  variables["params"]["head"]["task_0"]["bias"] = variables["params"]["head"]["task_0"]["bias"] + 1
  checkpointing.save_variables(source, variables)
  with pytest.raises(train.ConfigError, match=r"teacher_from: the content of \['superior'\] "
                                              "changed"):
    train.train_and_evaluate(_distill_config(), str(tmp_path))


def test_a_teacher_for_a_task_without_one_and_a_missing_one_are_errors(tmp_path, toy_distill):
  config = _distill_config()
  config.stages.superior.teacher_from = "distill"  # also a cycle, checked first
  with pytest.raises(train.ConfigError, match="cycle"):
    train.train_and_evaluate(config, str(tmp_path / "a"))
  config = _distill_config()
  config.stages.distill.teacher_from = ""
  with pytest.raises(train.ConfigError, match="needs a teacher"):
    train.train_and_evaluate(config, str(tmp_path / "b"))
  assert not (tmp_path / "b").exists()


def test_micro_batches_are_strided_rows():
  x = np.arange(12).reshape(12, 1)
  micro = train.micro_batches({"x": x}, 3)["x"]
  assert micro.shape == (3, 4, 1)
  np.testing.assert_array_equal(micro[1, :, 0], [1, 4, 7, 10])


def test_each_step_logs_the_schedules_lr_and_the_norms(tmp_path):
  config = helpers.tiny_guidance_config(steps=5)
  opt = config.stages.inferior.opt
  opt.schedule, opt.warmup_steps, opt.lr = "cosine", 2, 0.01
  train.train_and_evaluate(config, str(tmp_path))
  lines = helpers.metrics_lines(tmp_path / "inferior" / "metrics.jsonl")
  from medguide_jax import optim  # pylint: disable=g-import-not-at-top
  schedule = optim.make_schedule(train.resolve_stage(config.stages.inferior).opt, 5)
  np.testing.assert_allclose([l["train/lr"] for l in lines],
                             [float(schedule(s)) for s in range(5)], rtol=1e-6)
  assert lines[0]["train/lr"] == 0.0 and lines[2]["train/lr"] == pytest.approx(0.01)
  assert all(l["train/update_norm"] >= 0 and l["train/param_norm"] > 0 for l in lines)
  assert lines[0]["train/update_norm"] == 0.0 and lines[1]["train/update_norm"] > 0  # lr 0


def test_fsdp_rules_that_match_no_parameter_are_an_error(tmp_path):
  config = helpers.tiny_guidance_config(steps=2)
  config.mesh.fsdp_rules = "encoder/.*"
  with pytest.raises(train.ConfigError, match=r"mesh.fsdp_rules regex 'encoder/\.\*' matches "
                                              r"no parameter path.*enc_inferior/"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not tmp_path.joinpath("inferior").exists()


_HLO = """
import sys
sys.path.insert(0, {root!r})
import jax
from etils import epath
from medguide_jax import parallel, train
from tests import helpers
config = helpers.tiny_guidance_config(steps=2)
config.stages.inferior.opt.accumulate_steps = 2
setup = train.StageSetup(config, "inferior", epath.Path({workdir!r}), parallel.make_mesh())
spec = setup.state_spec
example = train._example_batch(setup.dataset("train", train=True))
batch = train._abstract_global(example, 16, setup.mesh)
def gathers():
  step = train.jit_train_step(setup, spec.tx, spec.shardings, spec.abstract.model_state)
  return step.lower(spec.abstract, batch).compile().as_text().count("all-gather-start") + \\
      step.lower(spec.abstract, batch).compile().as_text().count("all-gather(")
print("strided", gathers())
train.micro_batches = lambda b, k: jax.tree.map(lambda x: x.reshape((k, -1) + x.shape[1:]), b)
print("contiguous", gathers())
"""


def test_accumulated_step_compiles_without_all_gathers_on_4_devices(tmp_path):
  """With XLA's optimisations on (conftest turns most off for speed)."""
  import os, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_DISABLE_MOST_OPTIMIZATIONS="0", JAX_COMPILATION_CACHE_DIR="")
  code = _HLO.format(root=str(helpers.ROOT), workdir=str(tmp_path))
  out = subprocess.run([sys.executable, "-c", code], env=env, cwd=helpers.ROOT, check=True,
                       capture_output=True, text=True, timeout=helpers.HANG_GUARD_S).stdout
  counts = dict(line.split() for line in out.splitlines() if line.split()[0] in
                ("strided", "contiguous"))
  assert counts["strided"] == "0"
  assert int(counts["contiguous"]) > 0  # the check can fail: the old split needs them


def test_stop_when_stops_at_the_first_evaluation_where_it_holds_and_a_resume_stays_stopped(
    tmp_path):
  c = helpers.tiny_guidance_config(steps=8)
  s = c.stages.inferior
  s.eval_every, s.checkpoint_every, s.patience = 2, 8, 0
  s.stop_when = "eval/train/loss<1e9"   # holds at the first evaluation (step 2)
  train.train_and_evaluate(c, str(tmp_path))
  lines = helpers.metrics_lines(tmp_path / "inferior" / "metrics.jsonl")
  assert max(l["step"] for l in lines) == 2
  assert "eval/train/loss" in lines[-1] and "eval/validation/loss" in lines[-1]
  record = json.loads((tmp_path / "inferior" / "stop_when.json").read_text())
  assert record["step"] == 2 and record["rule"] == s.stop_when
  # A rerun (everything finished) and a resume from the stopping checkpoint train no more.
  (tmp_path / "inferior" / "results.json").unlink()
  train.train_and_evaluate(c, str(tmp_path))
  assert max(l["step"] for l in helpers.metrics_lines(
      tmp_path / "inferior" / "metrics.jsonl")) == 2


@pytest.mark.parametrize("rule", ["train/loss", "val/auc>0.5", "eval/test/auc>0.5",
                                  "train/loss>>1"])
def test_a_malformed_stop_when_is_a_config_error(tmp_path, rule):
  c = helpers.tiny_guidance_config()
  c.stages.inferior.stop_when = rule
  with pytest.raises(train.ConfigError, match="stop_when"):
    train.train_and_evaluate(c, str(tmp_path))
  assert not (tmp_path / "inferior").exists()


def test_num_epochs_sets_num_steps_from_the_training_split_and_the_batch(tmp_path):
  c = helpers.tiny_guidance_config(steps=99)
  s = c.stages.inferior
  s.train_examples, s.batch_size, s.num_epochs = 40, 16, 1.5  # 3 updates a pass: 4.5 -> 5
  s.eval_every = s.checkpoint_every = -1
  train.train_and_evaluate(c, str(tmp_path))
  lines = helpers.metrics_lines(tmp_path / "inferior" / "metrics.jsonl")
  assert max(l["step"] for l in lines) == 5
  assert json.loads((tmp_path / "inferior" / "results.json").read_text())["stages"][
      "inferior"]["step"] in range(1, 6)
  resolved = train.resolve_stage(s, steps_per_epoch=3)
  assert resolved.num_steps == 5 and resolved.eval_every == 1  # derived from the 5 steps
  assert train.resolve_stage(s).num_steps == 99  # no epoch size known: num_steps stands


# --------------------------------------------------------------------------- select_after
def _scripted_validation(monkeypatch, losses: dict[int, float]):
  """Makes each evaluation during training report `losses[step]` as its validation loss
  (the final evaluation of every split is left as it is)."""
  real = train.evaluate_split

  def scripted(setup, variables, split, *, bootstrap=0, during_training=False):
    metrics = real(setup, variables, split, bootstrap=bootstrap,
                   during_training=during_training)
    if during_training and split == "validation":
      metrics["loss"] = losses[scripted.steps.pop(0)]
    return metrics

  scripted.steps = sorted(losses)
  monkeypatch.setattr(train, "evaluate_split", scripted)


# Best at the first evaluation (step 1); among the evaluations from step 2 on, best at 3,
# then two without improvement (4, 5).
_LOSSES = {1: 1.0, 2: 3.0, 3: 2.0, 4: 2.5, 5: 2.6, 6: 0.5}


def _warmup_config(select_after: int):
  c = helpers.tiny_guidance_config(steps=6)
  s = c.stages.inferior
  s.eval_every, s.checkpoint_every, s.patience, s.select_after = 1, 6, 2, select_after
  return c


def test_select_after_keeps_a_later_evaluation_and_patience_counts_from_it(tmp_path,
                                                                          monkeypatch):
  # Without the warm-up: step 1 is the best, and patience 2 stops at step 3.
  with monkeypatch.context() as m:
    _scripted_validation(m, _LOSSES)
    plain = train.train_and_evaluate(_warmup_config(0), str(tmp_path / "plain"))
  assert plain["stages"]["inferior"]["step"] == 1
  assert max(l["step"] for l in helpers.metrics_lines(
      tmp_path / "plain" / "inferior" / "metrics.jsonl")) == 3
  # select_after=2: step 1 is evaluated and logged but no candidate; 2 and then 3 are best,
  # and patience counts from there (4, 5): the stage stops at 5, keeping step 3.
  with monkeypatch.context() as m:
    _scripted_validation(m, _LOSSES)
    warm = train.train_and_evaluate(_warmup_config(2), str(tmp_path / "warm"))
  assert warm["stages"]["inferior"]["step"] == 3
  assert warm["stages"]["inferior"]["checkpoint"] == "best"
  lines = helpers.metrics_lines(tmp_path / "warm" / "inferior" / "metrics.jsonl")
  assert max(l["step"] for l in lines) == 5
  logged = {l["step"]: l["eval/validation/loss"] for l in lines if "eval/validation/loss" in l}
  assert logged == {k: v for k, v in _LOSSES.items() if k <= 5}


@pytest.mark.parametrize("change, message", [
    (dict(select_after=-1), r"stages.inferior.select_after=-1: must be >= 0"),
    (dict(select_after=6), r"stages.inferior.select_after=6: must be < num_steps=6"),
    (dict(select_after=3, select=""), r"stages.inferior.select_after=3: has no effect "
                                      r"without select"),
    # num_epochs sets num_steps at run time (40 examples / batch 16: 3 steps an epoch).
    (dict(select_after=3, num_epochs=1.0, train_examples=40),
     r"stages.inferior.select_after=3: must be < num_steps=3"),
])
def test_a_bad_select_after_is_a_config_error(tmp_path, change, message):
  c = _warmup_config(0)
  c.stages.inferior.update(change)
  with pytest.raises(train.ConfigError, match=message):
    train.train_and_evaluate(c, str(tmp_path))
  assert not (tmp_path / "inferior").exists()


def test_a_stage_field_added_after_a_record_counts_as_unchanged_only_when_off():
  from medguide_jax import stage_records  # pylint: disable=g-import-not-at-top
  old = {"num_steps": 10, "select": "min:val/loss"}
  assert stage_records.changed_keys(old, {**old, "select_after": 0, "train_stratify": "",
                                          "evals.paired.against": ""}) == []
  assert stage_records.changed_keys(old, {**old, "select_after": 3}) == ["select_after"]
  assert stage_records.changed_keys({**old, "select_after": 3},
                                    {**old, "select_after": 0}) == ["select_after"]
  assert stage_records.changed_keys(old, {"num_steps": 20, "select": "min:val/loss"}) == [
      "num_steps"]
