"""A step that cannot fit is refused before it runs: XLA's estimate against the device's memory."""

import jax
import jax.numpy as jnp
import pytest

from semmae_jax.runtime import host_memory
from semmae_jax.train import step_memory


def _compiled(rows: int) -> jax.stages.Compiled:
    return jax.jit(lambda x: jnp.tanh(x @ x.T).sum()).lower(jax.ShapeDtypeStruct((rows, 256), jnp.float32)).compile()


def test_a_step_larger_than_the_limit_is_refused_in_one_line_with_the_estimate_and_the_levers():
    compiled = _compiled(1024)
    needed = step_memory.step_bytes(compiled)
    assert needed >= 1024 * 256 * 4  # at least its argument
    with pytest.raises(ValueError) as refused:
        step_memory.check_fits(compiled, (needed - 1, "the test's device"))
    message = str(refused.value)
    assert "\n" not in message
    assert f"{needed / step_memory.GIB:.1f} GiB per device (XLA's estimate), more than the test's device" in message
    assert "--batch_size" in message and "--remat" in message and "--mesh" in message
    step_memory.check_fits(compiled, (needed, "the test's device"))  # exactly fits: runs


def test_on_cpu_the_limit_is_the_free_host_memory_shared_by_the_local_devices(monkeypatch):
    monkeypatch.setattr(step_memory, "available_host_bytes", lambda: 8000000 * 1024)
    limit, what = step_memory.device_limit()
    assert limit == 8000000 * 1024 // jax.local_device_count()
    assert what == f"the free host memory shared by {jax.local_device_count()} CPU devices"


def test_available_host_memory_is_read_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   8000000 kB\n")
    assert host_memory.available_host_bytes(meminfo) == 8000000 * 1024
    assert host_memory.available_host_bytes(tmp_path / "missing") is None
