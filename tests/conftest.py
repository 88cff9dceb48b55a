"""Test-wide setup: eight fake CPU devices for sharding tests, float32 matmuls.

XLA_FLAGS must be set before jax is imported anywhere, which is why it lives here.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Exact float32 matmuls on every backend, so equivalence tests mean what they say.
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture
def cheap_xla_compiles():
    """Compile with few XLA optimizations while a test runs (tiny shapes: compile time dominates).

    Set and restored per test, so files that do not ask for it compile as usual.
    """
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)
