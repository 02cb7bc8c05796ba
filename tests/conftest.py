"""Test configuration: strict dtype promotion and rank promotion errors, as equinox's tests run.

The settings are JAX context managers entered per test, so nothing leaks between tests (optax's
float64 test once turned x64 on for the rest of the run).
"""

import jax
import pytest


@pytest.fixture(autouse=True)
def _strict_jax(request):
    if request.node.get_closest_marker("loose_promotion"):
        with jax.numpy_rank_promotion("raise"):
            yield
        return
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        yield


@pytest.fixture(autouse=True)
def _no_x64_leak():
    before = jax.config.jax_enable_x64
    yield
    assert jax.config.jax_enable_x64 == before, "a test changed jax_enable_x64 globally"


# Scripts that the multi-device tests run in a subprocess (with 8 host devices); pytest's
# --doctest-modules must not import them in a 1-device process.
collect_ignore_glob = ["_*_script.py"]
