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


# The long end-to-end tests, marked here in one place: ``pytest`` skips them (under 5 minutes on
# 2 cores), ``pytest -m slow`` runs only them, and CI (.ci/run) runs both. Tests with
# ``@pytest.mark.slow`` in their module are slow too.
_SLOW_FIXTURES = {"quick_run"}  # test_lab.py: one `jaxnorm lab --quick` run per module
_SLOW_TESTS = {
    "tests/test_lab.py::test_only_in_a_subprocess",
    "tests/test_examples.py::test_readme_tour_runs",
    "tests/test_preprocessing_multidevice.py::test_sharded_fit_equals_single_device",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        base = item.nodeid.split("[")[0]
        if base in _SLOW_TESTS or _SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
