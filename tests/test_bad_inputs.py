"""The bad-input catalogue: every config mistake is exit 2 with one line naming the key and
the value, and nothing is written (run in-process through main, which returns the code)."""
from __future__ import annotations

import json

import pytest

from medguide_jax import main as main_lib
from medguide_jax import evaluate, train
from tests import helpers

_BASE = "configs/guidance.py:smoke,stages=inferior"
_S = "--config.stages.inferior."

# (case, config file[:arg], overrides, what the message must name)
CASES = [
    ("missing config file", "configs/nope.py", [], ["configs/nope.py"]),
    ("unknown config arg", "configs/guidance.py:smoke,sizes=cpu", [], ["sizes"]),
    ("bad config arg value", "configs/guidance.py:size=huge", [], ["huge"]),
    ("unknown override key", _BASE, [_S + "num_step=3"], ["num_step"]),
    ("override of the wrong type", _BASE, [_S + "num_steps=abc"], ["num_steps", "abc"]),
    ("unsupported dtype", _BASE, ["--config.compute_dtype=float8"], ["compute_dtype", "float8"]),
    ("invalid freeze regex", _BASE, [_S + "freeze=enc("], ["stages.inferior.freeze", "enc("]),
    ("zero batch size", _BASE, [_S + "batch_size=0"], ["stages.inferior.batch_size=0"]),
    ("zero eval batch size", _BASE, [_S + "eval_batch_size=0"],
     ["stages.inferior.eval_batch_size=0"]),
    ("negative num_steps", _BASE, [_S + "num_steps=-5"], ["stages.inferior.num_steps=-5"]),
    ("nan learning rate", _BASE, [_S + "opt.lr=nan"], ["stages.inferior.opt.lr=nan"]),
    ("negative learning rate", _BASE, [_S + "opt.lr=-0.1"], ["stages.inferior.opt.lr=-0.1"]),
    ("momentum above 1", _BASE, [_S + "opt.momentum=1.5"], ["stages.inferior.opt.momentum=1.5"]),
    ("adam b2 of 1", _BASE, [_S + "opt.b2=1.0"], ["stages.inferior.opt.b2=1.0"]),
    ("no micro-batches", _BASE, [_S + "opt.accumulate_steps=0"],
     ["stages.inferior.opt.accumulate_steps=0"]),
    ("micro-batches that do not divide", _BASE, [_S + "opt.accumulate_steps=3"],
     ["accumulate_steps=3"]),
    ("warmup longer than the stage", _BASE, [_S + "opt.warmup_steps=500"],
     ["stages.inferior.opt.warmup_steps=500", "num_steps=300"]),
    ("unknown optimiser", _BASE, [_S + "opt.name=rmsprop"], ["rmsprop"]),
    ("unknown schedule", _BASE, [_S + "opt.schedule=linear"], ["linear"]),
    ("weight decay mask matching nothing", _BASE,
     [_S + "opt.weight_decay=0.1", _S + "opt.weight_decay_mask=nothing/.*"],
     ["weight_decay_mask", "nothing/.*"]),
    ("select syntax", _BASE, [_S + "select=max:loss"], ["stages.inferior.select", "max:loss"]),
    ("select metric nobody gives", _BASE, [_S + "select=min:val/nope"],
     ["stages.inferior.select", "min:val/nope"]),
    ("negative patience", _BASE, [_S + "patience=-1"], ["stages.inferior.patience=-1"]),
    ("no checkpoints kept", _BASE, [_S + "keep_checkpoints=0"],
     ["stages.inferior.keep_checkpoints=0"]),
    ("negative bootstrap", _BASE, [_S + "bootstrap=-3"], ["stages.inferior.bootstrap=-3"]),
    ("init_from an unknown stage", _BASE, [_S + "init_from=nostage"],
     ["stages.inferior.init_from", "nostage"]),
    ("init_from a missing directory", _BASE, [_S + "init_from=/nonexistent/stage"],
     ["/nonexistent/stage"]),
    ("init_from itself", _BASE, [_S + "init_from=inferior"], ["itself"]),
    ("invalid init_params regex", _BASE, [_S + "init_params=enc("], ["enc("]),
    ("teacher for a task without one", "configs/guidance.py:smoke,stages=inferior+superior",
     [_S + "teacher_from=superior"], ["teacher_from", "superior"]),
    ("FSDP rule matching nothing", _BASE, ["--config.mesh.fsdp_rules=nomatch/.*"],
     ["mesh.fsdp_rules", "nomatch/.*"]),
    ("invalid FSDP regex", _BASE, ["--config.mesh.fsdp_rules=("], ["mesh.fsdp_rules", "("]),
    ("negative seed", _BASE, ["--config.seed=-1"], ["seed=-1"]),
    ("unknown dataset", _BASE, ["--config.data.name=unknown_ds"], ["unknown_ds"]),
    ("dropout above 1", _BASE, ["--config.model.head_dropout=1.5"],
     ["model.head_dropout=1.5"]),
    ("profile window syntax", _BASE, ["--config.profile_steps=1-9"], ["profile_steps", "1-9"]),
    ("resume change of a trained key", _BASE, ["--config.allow_resume_changes=lr"],
     ["allow_resume_changes", "lr"]),
    ("batch not divisible by the devices", _BASE, [_S + "batch_size=12"], ["batch_size", "12"]),
    ("negative data workers", _BASE, ["--config.data.num_workers=-1"],
     ["data.num_workers=-1"]),
]


@pytest.mark.parametrize("case,config,overrides,names", CASES, ids=[c[0] for c in CASES])
def test_a_config_mistake_is_exit_2_naming_it_with_nothing_written(case, config, overrides,
                                                                   names, tmp_path, capsys):
  del case
  workdir = tmp_path / "w"
  code = main_lib.main(["main", f"--config={config}", f"--workdir={workdir}", *overrides])
  err = capsys.readouterr().err
  assert code == 2, err
  lines = [l for l in err.splitlines() if l.startswith(("config error", "usage error"))]
  assert lines and "Traceback" not in err, err
  for name in names:
    assert name in lines[0], (name, lines[0])
  assert not workdir.exists()


def test_the_catalogue_is_large_enough():
  assert len(CASES) >= 30


# --------------------------------------------------------------------------- resume
def _preempted_run(workdir, monkeypatch, config, at=3):
  with monkeypatch.context() as m:
    m.setattr(train, "_preempted", lambda step: step == at)
    with pytest.raises(train.Preempted):
      train.train_and_evaluate(config, str(workdir))


def test_a_resume_refuses_a_changed_config_and_keeps_every_config_it_ran_under(tmp_path,
                                                                               monkeypatch):
  config = helpers.tiny_guidance_config(steps=6)
  _preempted_run(tmp_path, monkeypatch, config)
  before = (tmp_path / "inferior" / "stage_config.json").read_bytes()
  changed = helpers.tiny_guidance_config(steps=6)
  changed.stages.inferior.opt.lr = 0.5
  with pytest.raises(train.ConfigError, match=r"checkpoint at step 3.*stages\.inferior\.opt\.lr"):
    train.train_and_evaluate(changed, str(tmp_path))
  assert (tmp_path / "inferior" / "stage_config.json").read_bytes() == before
  longer = helpers.tiny_guidance_config(steps=8)
  with pytest.raises(train.ConfigError, match="allow_resume_changes"):
    train.train_and_evaluate(longer, str(tmp_path))
  longer.allow_resume_changes = "num_steps"
  train.train_and_evaluate(longer, str(tmp_path))
  records = json.loads((tmp_path / "inferior" / "stage_config.json").read_text())
  assert [r["step"] for r in records] == [0, 3]
  assert [r["config"]["stages.inferior.num_steps"] for r in records] == [6, 8]
  assert helpers.metrics_lines(tmp_path / "inferior" / "metrics.jsonl")[-1]["step"] == 8


def test_non_finite_loss_before_any_checkpoint_says_so(tmp_path):
  config = helpers.tiny_guidance_config(steps=6)
  config.stages.inferior.update(select="", checkpoint_every=0, log_every=1)
  config.stages.inferior.opt.update(name="sgd", lr=1e36)
  with pytest.raises(train.NonFiniteError, match="no checkpoint was written yet"):
    train.train_and_evaluate(config, str(tmp_path))


# --------------------------------------------------------------------------- exploring
def test_load_run_of_a_partial_run_picks_its_last_finished_stage(tmp_path, monkeypatch):
  config = helpers.tiny_guidance_config(stages=("inferior", "superior"), steps=2)
  del config.stages["superior"]  # as stages=inferior leaves it: default_stage not run
  train.train_and_evaluate(config, str(tmp_path))
  assert config.default_stage == "guided_plus"
  assert evaluate.load_run(tmp_path).stage == "inferior"


def test_evaluate_of_a_run_with_no_finished_stage_exits_1_naming_them(tmp_path, monkeypatch,
                                                                       capsys):
  from absl import flags  # pylint: disable=g-import-not-at-top
  config = helpers.tiny_guidance_config(steps=6)
  _preempted_run(tmp_path, monkeypatch, config)
  monkeypatch.setattr(flags.FLAGS["workdir"], "value", str(tmp_path))
  assert evaluate.main([]) == 1
  err = capsys.readouterr().err
  assert "no stage" in err and "inferior" in err
  assert not (tmp_path / "reevaluation.json").exists()
  with pytest.raises(FileNotFoundError, match="no stage .* has finished"):
    evaluate.load_run(tmp_path)
