"""The config check that runs before anything is written: every mistake is one ConfigError.

`check_config(config)` walks the whole resolved config: types, ranges, non-finite floats,
regexes, dtypes and stage references. Checks that need the data or the task (batch sizes
against devices and datasets, `select` against the declared metric keys, evaluators,
optimiser regexes against real parameter paths) run next, in train.StageSetup and
train._check_state, still before the workdir is touched. Each message names the full key,
the value and what is valid.
"""
from __future__ import annotations

import math
import re
from typing import Any

import ml_collections

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
  """Bad config or workdir contents, found before anything is written (exit code 2)."""


def flat_config(d: dict, prefix: str = "") -> dict[str, Any]:
  """A nested config dict as {'a.b.c': value}."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flat_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def source_names(spec: str) -> list[str]:
  """The entries of a comma-separated init_from / teacher_from (stage names or paths)."""
  return [s.strip() for s in spec.split(",") if s.strip()]


def _numbers(value) -> list:
  return list(value) if isinstance(value, (list, tuple)) else [value]


def _check_finite(flat: dict[str, Any]) -> None:
  for key, value in flat.items():
    for v in _numbers(value):
      if isinstance(v, float) and not math.isfinite(v):
        raise ConfigError(f"{key}={value!r}: must be a finite number")


def _check_range(key: str, value, *, lo=None, hi=None, lo_open=False, hi_open=False,
                 integer: bool = False) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (
      integer and not isinstance(value, int)):
    raise ConfigError(f"{key}={value!r}: must be {'an integer' if integer else 'a number'}")
  bad = ((lo is not None and (value <= lo if lo_open else value < lo)) or
         (hi is not None and (value >= hi if hi_open else value > hi)))
  if bad:
    lo_text = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
    hi_text = "" if hi is None else f"{'<' if hi_open else '<='} {hi}"
    raise ConfigError(f"{key}={value!r}: must be {' and '.join(t for t in (lo_text, hi_text) if t)}")


def _check_regex(key: str, value: str) -> None:
  try:
    re.compile(value)
  except re.error as e:
    raise ConfigError(f"{key}={value!r} is not a valid regex: {e}") from e


# (key suffix within a stage, kwargs of _check_range). -1 means "derived at run time".
_STAGE_RANGES = {
    "num_steps": dict(lo=0, integer=True), "num_epochs": dict(lo=0),
    "batch_size": dict(lo=0, lo_open=True, integer=True),
    "eval_batch_size": dict(lo=0, lo_open=True, integer=True),
    "log_every": dict(lo=-1, integer=True), "eval_every": dict(lo=-1, integer=True),
    "checkpoint_every": dict(lo=-1, integer=True),
    "keep_checkpoints": dict(lo=1, integer=True), "patience": dict(lo=0, integer=True),
    "select_after": dict(lo=0, integer=True),
    "bootstrap": dict(lo=0, integer=True), "train_examples": dict(lo=0, integer=True),
    "train_fraction": dict(lo=0, hi=1),
    "opt.lr": dict(lo=0), "opt.momentum": dict(lo=0, hi=1), "opt.b1": dict(lo=0, hi=1,
                                                                         hi_open=True),
    "opt.b2": dict(lo=0, hi=1, hi_open=True), "opt.eps": dict(lo=0, lo_open=True),
    "opt.weight_decay": dict(lo=0), "opt.warmup_steps": dict(lo=-1, integer=True),
    "opt.decay": dict(lo=0), "opt.end_lr_factor": dict(lo=0, hi=1),
    "opt.grad_clip_norm": dict(lo=0), "opt.accumulate_steps": dict(lo=1, integer=True),
    "opt.trust_coefficient": dict(lo=0, lo_open=True), "opt.warmup_start_factor": dict(lo=0, hi=1),
    "opt.lr_base_batch": dict(lo=0, integer=True), "opt.freeze_steps": dict(lo=0, integer=True),
}
_STAGE_REGEXES = ("freeze", "opt.weight_decay_mask", "opt.freeze_steps_params")
_SELECT = re.compile(r"(min|max):val/.+")
STOP_WHEN = re.compile(r"(?P<key>(?:eval/(?:train|validation)|train)/[^<>=\s]+)\s*"
                       r"(?P<op>>=|<=|>|<)\s*(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)")


def _check_references(name: str, key: str, spec: str, stages) -> None:
  """init_from / teacher_from: stage names of this config, or paths ('/' in them)."""
  for source in source_names(spec):
    if "/" not in source and source not in stages:
      raise ConfigError(f"stages.{name}.{key}={spec!r}: {source!r} is no stage of this config "
                        f"(stages: {sorted(stages)}) and not a path (a path holds '/')")


def check_select_after(prefix: str, stage) -> None:
  """select_after > 0 needs `select` and must be < num_steps (the trainer checks again once
  num_epochs has set num_steps)."""
  after = stage.get("select_after", 0)
  if not after:
    return
  if not stage.select:
    raise ConfigError(f"{prefix}.select_after={after}: has no effect without select (set "
                      f"{prefix}.select, e.g. 'min:val/loss', or select_after=0)")
  if after >= stage.num_steps:
    raise ConfigError(f"{prefix}.select_after={after}: must be < num_steps={stage.num_steps} "
                      "(evaluations from step select_after on are the candidates for the "
                      "best; the last step is always evaluated)")


def _check_stage(name: str, stage: ml_collections.ConfigDict, stages) -> None:
  flat = flat_config(stage.to_dict())
  prefix = f"stages.{name}"
  for key, rule in _STAGE_RANGES.items():
    if key in flat:
      _check_range(f"{prefix}.{key}", flat[key], **rule)
  for key in _STAGE_REGEXES:
    if flat.get(key):
      _check_regex(f"{prefix}.{key}", flat[key])
  if stage.select and not _SELECT.fullmatch(stage.select):
    raise ConfigError(f"{prefix}.select={stage.select!r}: expected '' (the last parameters), "
                      "'min:val/<metric>' or 'max:val/<metric>'")
  if stage.get("stop_when") and not STOP_WHEN.fullmatch(stage.stop_when):
    raise ConfigError(f"{prefix}.stop_when={stage.stop_when!r}: expected '<metric><op><value>'"
                      " with op one of > >= < <= and a metric under eval/train/, "
                      "eval/validation/ or train/, e.g. 'eval/train/bag/auc>0.98'")
  if not stage.get("num_epochs", 0) > 0:  # else num_steps is known at run time only
    check_select_after(prefix, stage)
  if stage.opt.warmup_steps > stage.num_steps and not stage.get("num_epochs", 0) > 0:
    raise ConfigError(f"{prefix}.opt.warmup_steps={stage.opt.warmup_steps}: must be <= "
                      f"num_steps={stage.num_steps}")
  for key in ("init_from", "teacher_from"):
    _check_references(name, key, stage.get(key, ""), stages)
  if name in source_names(f"{stage.init_from},{stage.get('teacher_from', '')}"):
    raise ConfigError(f"{prefix}: a stage cannot init_from or teacher_from itself")
  for key, value in flat.items():  # probabilities anywhere in the stage block
    if key.rsplit(".", 1)[-1].endswith(("_p", "dropout")):
      _check_range(f"{prefix}.{key}", value, lo=0, hi=1)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first mistake in the experiment config (see module doc)."""
  flat = flat_config(config.to_dict())
  _check_finite(flat)
  if config.get("compute_dtype", "float32") not in COMPUTE_DTYPES:
    raise ConfigError(f"compute_dtype={config.compute_dtype!r}: valid: {list(COMPUTE_DTYPES)}")
  _check_range("seed", config.seed, lo=0, integer=True)
  for key in ("data.num_workers", "data.prefetch"):
    if key in flat:
      _check_range(key, flat[key], lo=0, integer=True)
  if "data.image_size" in flat:
    _check_range("data.image_size", flat["data.image_size"], lo=0, lo_open=True, integer=True)
  if not config.data.get("name"):
    raise ConfigError("data.name is empty: which dataset?")
  if config.mesh.fsdp_rules:
    _check_regex("mesh.fsdp_rules", config.mesh.fsdp_rules)
  _check_range("mesh.min_fsdp_size_mb", config.mesh.min_fsdp_size_mb, lo=0)
  for key, value in flat.items():  # model-level probabilities (dropout rates and the like)
    if key.startswith("model.") and key.rsplit(".", 1)[-1].endswith(("_p", "dropout")):
      _check_range(key, value, lo=0, hi=1)
  if not config.get("stages"):
    raise ConfigError("config.stages is empty")
  for name in config.stages:
    _check_stage(name, config.stages[name], config.stages)
