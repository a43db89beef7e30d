"""medguide_jax: five medical-imaging methods on one JAX trainer."""
__version__ = "0.1.0"


def load_run(workdir, stage=None):
  """The config, model and parameters of a finished run's stage (see evaluate.load_run)."""
  from medguide_jax import evaluate  # pylint: disable=g-import-not-at-top
  return evaluate.load_run(workdir, stage)
