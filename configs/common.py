"""Shared config pieces: the `arg` parser and blocks every experiment uses.

`parse_arg` turns the text after ':' in `--config=configs/x.py:dataset=derm7pt,smoke`
into a typed ConfigDict, big_vision style: `key=value` pairs take the type of the
default, a bare `flag` means True, and an unknown key is an error naming it.
"""
from __future__ import annotations

import ml_collections

from medguide_jax import optim


def _parse_value(key: str, text: str, default):
  if isinstance(default, bool):
    if text.lower() in ("1", "true", "yes", ""):
      return True
    if text.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"config arg {key!r}: {text!r} is not a boolean")
  try:
    return type(default)(text)
  except ValueError as e:
    raise ValueError(f"config arg {key!r}: {text!r} is not a {type(default).__name__}") from e


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'a=1,flag,b=x' against `defaults` (which fix the keys and types)."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, text = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config arg {key!r}; valid: {', '.join(sorted(defaults))}")
    if not sep and not isinstance(defaults[key], bool):
      raise ValueError(f"config arg {key!r} needs a value ({key}=...)")
    out[key] = _parse_value(key, text.strip(), defaults[key]) if sep else True
  return ml_collections.ConfigDict(out)


def optimizer(name: str = "sgd", lr: float = 0.01, **kw) -> ml_collections.ConfigDict:
  """An optimiser block: every field of medguide_jax/optim.py, its defaults filled in and
  checked there (the one source). warmup_steps=-1 means min(100, num_steps // 10), and
  lr_base_batch > 0 scales lr linearly with batch_size; both are derived at run time."""
  return ml_collections.ConfigDict(optim.resolve(dict(name=name, lr=lr, **kw)))


def stage(task: str, *, num_steps: int, batch_size: int, opt: ml_collections.ConfigDict,
          **kw) -> ml_collections.ConfigDict:
  """One stage of an experiment: what the trainer needs to run it.

  Fields the trainer reads:
    task: which tasks/<method>.py mode the stage runs (e.g. 'inferior', 'guidance').
    num_steps, batch_size (global, over all devices and processes), opt.
    num_epochs: > 0 sets num_steps at run time to that many passes over the training split
      (ceil(examples / batch_size) updates each), e.g. BALNMP's 200 epochs; 0 = num_steps.
    log_every, eval_every, checkpoint_every, keep_checkpoints: in steps. -1 (the default)
      derives them from num_steps at run time (eval and checkpoint every tenth, log twice
      per eval), so overriding num_steps never leaves them stale; 0 = never (the last step
      is always logged, evaluated when `select` is set, and checkpointed).
    select: '' evaluates the last parameters; 'min:<metric>' / 'max:<metric>' keeps the
      best on the validation split (early stopping), e.g. 'min:val/loss'.
    patience: evaluations without improvement before stopping (0 = never stop early).
    select_after: a warm-up of `select`, in steps: evaluations before this step are run and
      logged but are no candidates for the best and do not count for patience (0 = every
      evaluation counts). Must be < num_steps; needs select.
    stop_when: '<metric><op><value>' stops training at the first evaluation where it holds,
      e.g. 'eval/train/bag/auc>0.98' (BALNMP: once the training AUC passes 0.98);
      eval/train/... evaluates the training split (eval mode) at each evaluation, and
      eval/validation/... or train/... read what that evaluation logs. '' = never.
    init_from: comma-separated stage names or workdirs whose parameters initialise this one
      (a parameter is taken from the first source that has it).
    init_params: which parameters init_from gives, as rules separated by ';': a regex of
      this stage's parameter paths takes the same paths ('' = all that exist), and
      '<target regex>=<source template>' maps them (e.g. 'img/(.*)=encoder/\\1' fills the
      tower img/ from another method's encoder/). A rule that loads nothing is an error.
    freeze: regex of parameter paths that do not train (their batch statistics neither).
    train_examples: > 0 trains on that many training examples only (a fixed random subset,
      the same for every seed and stage: label-efficiency studies); 0 = all.
    train_fraction: in (0, 1], the same as a share of the training split (0 = unused; set
      train_examples or train_fraction, not both).
    train_stratify: a record field ('label', 'labels') to stratify the subset by: per class
      (multi-label: per rarest positive label) a fixed share, at least one record, nested
      (the 1% subset lies inside the 10% one); '' = a plain random subset.
    teacher_from, teacher_params: for a task with a teacher (Task.init_teacher), the stages,
      workdirs or converted .npz files its frozen teacher is loaded from, and rules as
      init_params' mapping them. The teacher is never trained nor checkpointed: a resume
      reloads it and refuses a source whose content changed (W/<stage>/teacher.json).
    evals: evaluators beyond the task's own metrics, {name: {option: value}} (kNN,
      robustness, prediction files, pictures; medguide_jax/evaluation/evaluators.py).
      `--config.stages.S.evals.NAME.enabled=False` turns one off.
  """
  block = dict(task=task, num_steps=num_steps, num_epochs=0.0, batch_size=batch_size, opt=opt,
               eval_batch_size=128, log_every=-1, eval_every=-1, checkpoint_every=-1,
               keep_checkpoints=2, select="", patience=0, select_after=0, stop_when="",
               init_from="", init_params="",
               freeze="", bootstrap=1000, train_examples=0, train_fraction=0.0,
               train_stratify="", evals={}, teacher_from="",
               teacher_params="")
  unknown = set(kw) - set(block)
  if unknown:
    raise ValueError(f"unknown stage fields: {sorted(unknown)}")
  block.update(kw)
  block["num_epochs"] = float(block["num_epochs"])  # 1.5 epochs overrides as well as 20
  return ml_collections.ConfigDict(block)


def base_config() -> ml_collections.ConfigDict:
  """Fields every experiment has, whatever the method."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.default_stage = ""   # the stage load_run(W) returns ('' = the last)
  c.resume = ""          # a workdir whose checkpoint restores everything (if W has none)
  # Stage keys a resume may change, comma-separated, among num_steps, log_every, eval_every,
  # checkpoint_every, keep_checkpoints, patience, bootstrap (any other change is refused).
  c.allow_resume_changes = ""
  c.profile_steps = ""   # e.g. '10:15' traces steps [10, 15) into W/<stage>/profile
  c.compute_dtype = "float32"  # 'bfloat16' computes in bf16; parameters stay fp32
  c.mesh = ml_collections.ConfigDict(dict(fsdp_rules="", min_fsdp_size_mb=4.0))
  c.data = ml_collections.ConfigDict(dict(
      name="", data_dir="", manual_dir="", num_workers=0, prefetch=2, image_size=64))
  return c


def keep_stages(c: ml_collections.ConfigDict, stages: str) -> None:
  """Deletes every stage not named in `stages` ('a+b'); '' keeps all. Unknown names are an
  error listing the valid ones. An evaluator of a kept stage that compares against a deleted
  one (`against`, evaluation/paired.py) compares with nothing."""
  if not stages:
    return
  keep = stages.split("+")
  unknown = [s for s in keep if s not in c.stages]
  if unknown:
    raise ValueError(f"stages={stages!r}: unknown {unknown}; valid: {sorted(c.stages)}")
  for name in list(c.stages):
    if name not in keep:
      del c.stages[name]
  for stage in c.stages.values():  # an evaluator's comparison with a stage left out is off
    for spec in (stage.get("evals") or {}).values():
      if spec.get("against") and spec.against not in c.stages:
        spec.against = ""
