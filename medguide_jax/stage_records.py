"""What each stage ran under: W/<stage>/stage_config.json, and the rules for rerunning it.

The record is a list of {"step", "config"} entries: the part of the config that defines the
stage (volatile keys such as data workers left out), and the step it took effect. A finished
stage refuses any change; a stage with a checkpoint refuses changes except of
RESUMABLE_KEYS named in --config.allow_resume_changes, which are appended as a new entry.
"""
from __future__ import annotations

from medguide_jax import metric_writers
from medguide_jax.validation import ConfigError, flat_config


def stage_config(config, name: str) -> dict:
  """The part of the config that defines stage `name` (what a rerun must not change)."""
  flat = {k: v for k, v in _flatten(config.to_dict()).items()
          if not k.startswith("stages.") and k not in _VOLATILE_KEYS}
  flat.update({f"stages.{name}.{k}": v for k, v in _flatten(config.stages[name].to_dict()).items()
               if k not in ("log_every", "eval_batch_size")})
  return flat


_VOLATILE_KEYS = ("resume", "profile_steps", "default_stage", "data.num_workers", "data.prefetch",
                  "data.data_dir", "data.manual_dir", "allow_resume_changes")
# Stage fields a resume may change (--config.allow_resume_changes=...): they do not change
# what was already trained.
RESUMABLE_KEYS = ("num_steps", "num_epochs", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                  "patience", "bootstrap")


def _flatten(d: dict) -> dict:
  """flat_config with tuples as lists: the form the record takes once read back from JSON."""
  return {k: list(v) if isinstance(v, tuple) else v for k, v in flat_config(d).items()}


def _off(value) -> bool:
  """A stage field's 'not used' value: 0, '', False, None or empty."""
  return value is None or value is False or value in (0, "") or value in ([], {})


def changed_keys(old: dict, new: dict) -> list[str]:
  """Keys whose value differs between two stage records. A key only `new` has (a stage field
  added to the code after `old` was recorded, e.g. select_after) is unchanged when its value
  is the field's off value: that is how the recorded run behaved."""
  return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)
                and not (k not in old and _off(new[k])))


def read_records(setup) -> list[dict]:
  """W/<stage>/stage_config.json: every config the stage ran under, in order, each with the
  step it took effect ([] before the first start; a single dict is the old format)."""
  path = setup.dir / "stage_config.json"
  if not path.exists():
    return []
  saved = metric_writers.read_json(path)
  return saved if isinstance(saved, list) else [{"step": 0, "config": saved}]


def allowed_resume_changes(config) -> set[str]:
  allowed = {k.strip() for k in config.get("allow_resume_changes", "").split(",") if k.strip()}
  bad = sorted(allowed - set(RESUMABLE_KEYS))
  if bad:
    raise ConfigError(f"allow_resume_changes={config.allow_resume_changes!r}: {bad} would change "
                      f"what was already trained; only {list(RESUMABLE_KEYS)} may change on resume")
  return allowed


def check_finished(setup, config) -> bool:
  """True if the stage is done; a changed config for a done stage is an error."""
  if not (setup.dir / "results.json").exists():
    return False
  records = read_records(setup)
  changed = changed_keys(records[-1]["config"] if records else {},
                          stage_config(config, setup.name))
  if changed:
    raise ConfigError(f"stage {setup.name!r} in {setup.dir} is finished, but these config keys "
                      f"changed since: {', '.join(changed)}. Use a new workdir, or delete "
                      f"{setup.dir} to rerun it.")
  return True


def resume_records(setup, config, resume_step: int) -> list[dict] | None:
  """The stage records to write before training: a fresh start's one entry, a resume's with
  its allowed changes appended, or None (nothing to write). A resume with other changes is
  an error naming them."""
  new = stage_config(config, setup.name)
  records = read_records(setup)
  if not resume_step or not records:
    return [{"step": 0, "config": new}]
  changed = changed_keys(records[-1]["config"], new)
  if not changed:
    return None
  allowed = allowed_resume_changes(config)
  refused = [k for k in changed if k.rsplit(".", 1)[-1] not in allowed]
  if refused:
    raise ConfigError(
        f"stage {setup.name!r} in {setup.dir} has a checkpoint at step {resume_step}, and these "
        f"config keys changed since it started: {', '.join(refused)}. A resume must not change "
        f"what was trained: use a new workdir, or allow keys of {list(RESUMABLE_KEYS)} with "
        "--config.allow_resume_changes=key1,key2.")
  return records + [{"step": resume_step, "config": new}]
