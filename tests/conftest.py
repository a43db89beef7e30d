"""Test set-up: eight fake CPU devices, so sharded code runs as on a real mesh."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Tests run many tiny configs: compile fast, and share compiled steps between tests and
# the subprocesses they start (the cache never changes results, only start-up time).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.environ.get("TMPDIR", "/tmp"), "medguide_jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import pytest  # noqa: E402
from absl import flags  # noqa: E402

# grain's worker processes read absl flags; under pytest nobody parses them.
flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session", autouse=True)
def data_dir(tmp_path_factory):
  """One synthetic data dir per test session (MEDGUIDE_DATA_DIR), generated on first use."""
  path = os.environ.get("MEDGUIDE_TEST_DATA_DIR") or str(tmp_path_factory.mktemp("data"))
  os.environ["MEDGUIDE_DATA_DIR"] = path
  return path
