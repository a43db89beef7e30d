"""One module per method. `get_task(config, stage, train_source)` builds the stage's task."""
from __future__ import annotations


def get_task(config, stage, train_source):
  """The Task object for `stage.task` of this experiment's method (config.method)."""
  if config.method == "guidance":
    from medguide_jax.tasks import guidance  # pylint: disable=g-import-not-at-top
    return guidance.GuidanceTask(config, stage, train_source)
  if config.method == "ssl":
    from medguide_jax.tasks import ssl  # pylint: disable=g-import-not-at-top
    return ssl.SSLTask(config, stage, train_source)
  if config.method == "glam":
    from medguide_jax.tasks import glam  # pylint: disable=g-import-not-at-top
    return glam.GlamTask(config, stage, train_source)
  raise ValueError(f"unknown method {config.method!r}; valid: 'guidance', 'ssl', 'glam'")
