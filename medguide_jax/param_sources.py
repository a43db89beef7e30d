"""Where a stage's starting variables come from: `init_from` (parameters, mapped by
`init_params`) and `teacher_from` (frozen teacher variables, mapped by `teacher_params`).

Sources are finished stages (their saved `variables`) or converted `.npz` files of
'/'-joined keys. Rules are separated by ';': a regex of this stage's paths takes the same
paths, '<target regex>=<source template>' maps them (e.g. 'img/(.*)=encoder/\\1'). A teacher's
source content is hashed at first load (W/<stage>/teacher.json) and checked on every resume.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from medguide_jax import checkpointing, metric_writers, paths
from medguide_jax.validation import ConfigError, source_names


def source_stage_dir(workdir: epath.Path, source: str) -> epath.Path:
  """init_from names a stage of this workdir, or a path to a finished stage directory."""
  path = workdir / source if "/" not in source else epath.Path(source)
  if not (path / "results.json").exists():
    raise ConfigError(f"init_from/teacher_from {source!r}: {path} is not a finished stage "
                      "(no results.json there)")
  return path


def init_rules(init_params: str, what: str = "init_params"
               ) -> list[tuple[str, re.Pattern, str | None]]:
  """Parses init_params: rules separated by ';', each '<target regex>' (take the same path)
  or '<target regex>=<source template>' (take the source path the template gives from the
  target's groups, e.g. 'img/(.*)=encoder/\\1'). '' is one rule taking every path. The '='
  that splits a rule is the first whose left side compiles (so '(?=...)' stays a regex).
  Returns (rule text, target regex, source template or None) per rule."""
  rules = []
  for text in filter(None, (r.strip() for r in (init_params or ".*").split(";"))):
    for i in [i for i, ch in enumerate(text) if ch == "="] + [len(text)]:
      try:
        target = re.compile(text[:i])
      except re.error:
        continue
      rules.append((text, target, text[i + 1:] if i < len(text) else None))
      break
    else:
      raise ConfigError(f"{what}={init_params!r}: rule {text!r} is not a valid regex")
  return rules


def _init_source(key: str, rules, stored: dict[str, dict]) -> tuple[int, str, str] | None:
  """(rule index, source name, source key) for a target key '<collection>/<path>': the first
  rule whose regex fullmatches the path and whose source path exists in some init_from."""
  collection, _, path = key.partition("/")
  for r, (_, target, template) in enumerate(rules):
    m = target.fullmatch(path)
    if m is None:
      continue
    source_key = f"{collection}/{m.expand(template) if template is not None else path}"
    for name, flat in stored.items():
      if source_key in flat:
        return r, name, source_key
  return None


def _npz(source: str, what: str) -> str:
  """A converted-checkpoint source, checked to exist."""
  if not epath.Path(source).exists():
    raise ConfigError(f"{what} {source!r}: no such file")
  return source


def check_sources(spec: str, workdir: epath.Path, what: str) -> None:
  """The sources of `spec` given as paths (.npz files, finished stage directories) exist;
  stage names of the config are left to run first."""
  for source in source_names(spec):
    if source.endswith(".npz"):
      _npz(source, what)
    elif "/" in source:
      source_stage_dir(workdir, source)


def read_sources(workdir: epath.Path, spec: str, what: str) -> dict[str, dict[str, Any]]:
  """{source: {'<collection>/<path>': array}} of a comma-separated init_from / teacher_from:
  finished stages (their saved variables) or .npz files of '/'-joined keys (converted
  checkpoints)."""
  out = {}
  for source in source_names(spec):
    if source.endswith(".npz"):
      with np.load(_npz(source, what)) as f:
        out[source] = {k: f[k] for k in f.files}
    else:
      out[source] = paths.flatten(checkpointing.load_variables(
          source_stage_dir(workdir, source) / "variables"))
  return out


def map_from(variables: dict, stored: dict, rules, what: str) -> tuple[dict, set[str]]:
  """`variables` with each leaf some rule maps to a stored array replaced by it (first rule,
  then first source, wins); also the keys that were replaced. A rule that loads nothing is
  an error listing the modules the sources hold."""
  used, rules_used = set(), set()

  def take(path, leaf):
    key = paths.path_str(path)
    found = _init_source(key, rules, stored)
    if found is None:
      return leaf
    r, source, source_key = found
    value = stored[source][source_key]
    if tuple(value.shape) != tuple(leaf.shape):
      raise ConfigError(f"{what} {source!r}: {source_key} has shape {value.shape}, "
                        f"the config's {key} wants {leaf.shape}")
    used.add(key)
    rules_used.add(r)
    return jnp.asarray(value, leaf.dtype)

  out = jax.tree_util.tree_map_with_path(take, variables)
  unused = [text for r, (text, _, _) in enumerate(rules) if r not in rules_used]
  if unused:
    have = sorted({k.partition("/")[2].rsplit("/", 1)[0] for f in stored.values() for k in f})
    raise ConfigError(f"{what}: rule(s) {unused} loaded no parameter of this stage; the "
                      f"sources hold modules {have[:40]}{' ...' if len(have) > 40 else ''}")
  return out, used


def load_init(variables: dict, stage, workdir: epath.Path) -> dict:
  """Overwrites leaves of `variables` with those of the init_from stages, mapped by the
  init_params rules."""
  stored = read_sources(workdir, stage.init_from, "init_from")
  out, used = map_from(variables, stored, init_rules(stage.init_params),
                        f"init_from {stage.init_from!r}: init_params")
  logging.info("init_from %s: %d arrays loaded", stage.init_from, len(used))
  return out


def content_hash(flat: dict[str, Any]) -> str:
  """sha256 over a flat {key: array} mapping (keys, dtypes, shapes and bytes, in key order)."""
  digest = hashlib.sha256()
  for key in sorted(flat):
    value = np.ascontiguousarray(flat[key])
    digest.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def check_teacher_record(record: epath.Path, stage_name: str, teacher_from: str,
                         hashes: dict[str, str]) -> None:
  """`record` (W/<stage>/teacher.json) keeps the teacher sources' content hashes of the first
  load; a later load (a resume) must find the same content."""
  if record.exists():
    old = metric_writers.read_json(record)["sha256"]
    changed = sorted(k for k in set(old) | set(hashes) if old.get(k) != hashes.get(k))
    if changed:
      raise ConfigError(f"stages.{stage_name}.teacher_from: the content of {changed} changed "
                        f"since this stage first loaded it (recorded in {record}); resuming "
                        "would train against another teacher. Restore the source, or use a "
                        "new workdir.")
  elif metric_writers.is_writer():
    record.parent.mkdir(parents=True, exist_ok=True)
    metric_writers.write_json_atomic(record, {"teacher_from": teacher_from, "sha256": hashes})


def load_teacher(stage, stage_name: str, stage_dir: epath.Path, abstract_teacher,
                 shardings, workdir: epath.Path):
  """The frozen teacher: every leaf of the task's teacher structure from `teacher_from`,
  mapped by `teacher_params` (init_params' syntax), put on `shardings`."""
  stored = read_sources(workdir, stage.teacher_from, "teacher_from")
  check_teacher_record(stage_dir / "teacher.json", stage_name, stage.teacher_from,
                       {k: content_hash(v) for k, v in stored.items()})
  what = f"teacher_from {stage.teacher_from!r}: teacher_params"
  teacher, used = map_from(abstract_teacher, stored,
                           init_rules(stage.get("teacher_params", "")), what)
  missing = [k for k in paths.paths(abstract_teacher) if k not in used]
  if missing:
    raise ConfigError(f"{what} left teacher variables unloaded: {paths.examples(missing)}")
  logging.info("[%s] teacher from %s: %d arrays", stage_name, stage.teacher_from, len(used))
  return jax.device_put(teacher, shardings)
