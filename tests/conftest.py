"""Test configuration: strict dtype promotion and rank promotion errors, as equinox's tests run.

The settings are JAX context managers entered per test, so nothing leaks between tests (optax's
float64 test once turned x64 on for the rest of the run).

Compilation dominates the suite's time on CPU (many small programs), so the tests share JAX's
persistent compilation cache: the two xdist workers reuse each other's programs within a run
(test_batchnorm.py: 115 s -> 94 s from an empty cache on 2 cores), and a second run reuses the
first's (49 s). The cache holds XLA's compiled executables keyed by the program, the compile
options and the versions, so the numerics are those of a fresh compile. Set
``JAX_COMPILATION_CACHE_DIR`` to choose its folder (default: the system's temporary folder); the
variables are set in the environment, so subprocesses (multi-device scripts, the lab, the
notebooks) share it too.
"""

import os
import tempfile

# One OpenBLAS thread per process (LAPACK's QR behind orthogonal, SciPy): the xdist workers
# already use both cores, and two BLAS threads per worker on them made a 300x200 QR take ~1 s
# instead of ~2 ms. Set before NumPy loads OpenBLAS; a value in the environment wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxnorm-tests-jax-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax
import pytest

# jax may have been imported before this file (a plugin): the settings are applied here too.
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)
jax.config.update(
    "jax_persistent_cache_min_entry_size_bytes",
    int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]),
)


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


# The long end-to-end tests, marked here in one place: ``pytest`` skips them, ``pytest -m slow``
# runs only them, and CI (.ci/run) runs both. Tests with ``@pytest.mark.slow`` in their module
# are slow too. End-to-end means a model trained through the whole stack (fit, train, a search
# or an ensemble on the digits or a Flax CNN), the lab, a notebook, or several devices or
# processes; each test listed by name took 3.5 s or more on 2 cores from an empty compilation
# cache, and the modules listed are such tests throughout.
_SLOW_FIXTURES = {"quick_run"}  # test_lab.py: one `jaxnorm lab --quick` run per module
_SLOW_MODULES = {
    "tests/test_flax_training.py",  # a linen and an nnx CNN through every training tool
    "tests/test_parallel.py",  # searches and ensembles in per-core groups
    "jaxnorm/lab/setup_experiments.py",  # the lab's experiments, in their docstrings
    "jaxnorm/training/_flax.py",  # from_linen / from_nnx: a Flax model fitted on the digits
}
_SLOW_TESTS = {
    "tests/test_lab.py::test_only_in_a_subprocess",
    "tests/test_examples.py::test_readme_tour_runs",
    "tests/test_preprocessing_multidevice.py::test_sharded_fit_equals_single_device",
    "tests/test_training.py::test_mlp_batch_norm_trains_and_updates_state",
    "tests/test_training.py::test_train_equals_fit_and_logs",
    "tests/test_training.py::test_fit_passes_every_step_a_fresh_key_for_dropout",
    "tests/test_training.py::test_overfit_small_subset",
    "tests/test_ensemble.py::test_shared_data_key_equals_sequential_fits",
    "tests/test_ensemble.py::test_batch_norm_members_and_ema",
    "tests/test_ensemble.py::test_snapshot_ensemble_of_a_batch_norm_model",
    "tests/test_ensemble.py::test_ensemble_predict_averages_probabilities",
    "tests/test_search.py::test_static_choice_searches_widths",
    "tests/test_search.py::test_reproducible_and_chunking_does_not_change_results",
    "tests/test_update_batch_stats.py::test_stacked_iterable_and_jit_agree",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        base = item.nodeid.split("[")[0]
        slow = base in _SLOW_TESTS or base.split("::")[0] in _SLOW_MODULES
        if slow or _SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
