"""Test session set-up.

* 8 fake CPU devices, so that sharding tests can build real meshes; set before JAX starts.
* XLA's persistent compilation cache: many tests (and the processes they start) compile
  the same small programs; on 2 cores compiling dominates the suite's time otherwise.
* One demo dataset for the session (`demo_root`), in a private cache that the jobs and the
  processes the tests start find through $SEMMAE_CACHE.
* torchvision is imported before anything imports TensorFlow: triton (loaded by
  torch._dynamo, which torchvision's ops import) crashes the process when its extension
  is loaded after TensorFlow's. Importing it first is the supported order, not a patch.
"""

import os
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / "semmae_jax_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from pathlib import Path as _Path

import pytest
import torchvision  # noqa: F401  (must precede TensorFlow, see above)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> _Path:
    """The demo dataset, generated once into a session cache that $SEMMAE_CACHE points to."""
    from semmae_jax.data import demo_data

    old = os.environ.get("SEMMAE_CACHE")
    os.environ["SEMMAE_CACHE"] = str(tmp_path_factory.mktemp("semmae_cache"))
    yield demo_data()
    if old is None:
        del os.environ["SEMMAE_CACHE"]
    else:
        os.environ["SEMMAE_CACHE"] = old
