"""flax's own BatchNorm test suites, run against jaxnorm's modules (the flax rows of
docs/peer_suites.md).

Reuses the substitution plugin ``jaxnorm_substitute`` (groups ``linen`` and ``nnx``) and
``run.py``'s ``run_mode`` next to this file; what it adds is flax's suites as issue 17 counts
them, each test file in a process of its own (a test that fails inside an nnx transform can leave
nnx's global context behind for the next file), the one-sided modes and ``--loosen-equal``::

    python tools/peer_suites/run.py extract flax --repo <flax clone> --dest /tmp/peer/flax
    python tools/peer_suites/flax_substitute.py /tmp/peer/flax --out /tmp/peer/flax-suites

Modes (``--modes``, default ``none,jaxnorm``): ``none`` runs flax's classes (the baseline),
``jaxnorm`` swaps both ``flax.linen.BatchNorm`` and ``flax.nnx.BatchNorm`` for jaxnorm's,
``jaxnorm-nnx`` (``jaxnorm-linen``) swaps only nnx's (linen's), so that flax's nnx-versus-linen
equivalence tests compare jaxnorm's module with flax's. ``--loosen-equal=RTOL`` turns the test
modules' ``np.testing.assert_array_equal`` into ``assert_allclose(rtol=RTOL, equal_nan=True)``,
to show that a bit-exact comparison holds to that tolerance (this module is then also loaded as a
pytest plugin, ``-p flax_substitute``, for that option only).

For every suite and mode it prints the tests counted (those that use BatchNorm), how many pass,
and each failure with its message; the JSON reports are under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent

# suite -> test files, relative to the extracted flax tree (flax 0.12.8, commit 3a491108).
SUITES = {
    "flax linen BatchNorm tests": [
        "tests/linen/linen_test.py",
        "tests/linen/linen_module_test.py",
        "tests/linen/linen_transforms_test.py",
        "tests/linen/summary_test.py",
    ],
    "flax nnx normalization tests": ["tests/nnx/nn/normalization_test.py"],
    "flax nnx tests using BatchNorm inside models": [
        "tests/nnx/transforms_test.py",
        "tests/nnx/integration_test.py",
        "tests/nnx/module_test.py",
        "tests/nnx/graph_utils_test.py",
        "tests/nnx/summary_test.py",
        "tests/nnx/helpers_test.py",
        "tests/nnx/bridge/wrappers_test.py",
    ],
}

# mode -> (jaxnorm_substitute's --substitute, its --substitute-groups)
MODES = {
    "none": ("none", "linen,nnx"),
    "jaxnorm": ("jaxnorm", "linen,nnx"),
    "jaxnorm-nnx": ("jaxnorm", "nnx"),
    "jaxnorm-linen": ("jaxnorm", "linen"),
}


# ------------------------------------------------------------ the pytest plugin: --loosen-equal


def pytest_addoption(parser):
    parser.getgroup("flax_substitute").addoption(
        "--loosen-equal",
        type=float,
        default=None,
        metavar="RTOL",
        help="the test modules' np.testing.assert_array_equal becomes assert_allclose(rtol=RTOL)",
    )


def _loose_numpy(rtol: float) -> types.ModuleType:
    import numpy

    def assert_array_equal(actual, desired, err_msg="", verbose=True, *, strict=False):
        numpy.testing.assert_allclose(
            actual, desired, rtol=rtol, atol=0, equal_nan=True, err_msg=err_msg, verbose=verbose
        )

    testing = types.ModuleType("numpy.testing")
    testing.__dict__.update(vars(numpy.testing))
    testing.assert_array_equal = assert_array_equal
    module = types.ModuleType("numpy")
    module.__dict__.update(vars(numpy))
    module.testing = testing
    return module


def pytest_collection_finish(session):
    """Swap the test modules' ``np`` (their globals only) when --loosen-equal is given."""
    import numpy

    rtol = session.config.getoption("--loosen-equal")
    if rtol is None:
        return
    loose = _loose_numpy(rtol)
    for item in session.items:
        module = getattr(item, "module", None)
        if module is not None and module.__dict__.get("np") is numpy:
            module.np = loose


# ------------------------------------------------------------------------------------ runner


def _run_suite(tree: Path, files: list[str], mode: str, out: Path, extra: list[str]) -> dict:
    sys.path.insert(0, str(HERE))
    from run import run_mode  # tools/peer_suites/run.py

    substitute, groups = MODES[mode]
    tests: dict = {}
    for test_file in files:
        where = out / mode / Path(test_file).stem
        where.mkdir(parents=True, exist_ok=True)
        tests.update(run_mode(tree, substitute, [test_file], groups, where, extra))
    return tests


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tree", type=Path, help="the extracted flax tree (tests/ in it)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/peer/flax-suites"))
    parser.add_argument("--modes", default="none,jaxnorm", help=f"from {sorted(MODES)}")
    parser.add_argument("--suite", action="append", choices=sorted(SUITES), help="default all")
    parser.add_argument("--workers", default="2", help="pytest-xdist's -n (0: in one process)")
    parser.add_argument("--loosen-equal", type=float, default=None, metavar="RTOL")
    args = parser.parse_args(argv)
    # As flax's tests/run_all_tests.sh runs them.
    os.environ.update(
        JAX_NUMPY_RANK_PROMOTION="raise",
        FLAX_PROFILE="1",
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
    )
    extra = ["-n", args.workers] if args.workers != "0" else []
    if args.loosen_equal is not None:
        extra += ["-p", "flax_substitute", f"--loosen-equal={args.loosen_equal}"]
    tree = args.tree.resolve()
    for suite, files in SUITES.items():
        if args.suite and suite not in args.suite:
            continue
        for mode in args.modes.split(","):
            out = args.out / suite.replace(" ", "_")
            tests = _run_suite(tree, files, mode, out, extra)
            (out / f"{mode}.json").write_text(json.dumps(tests, indent=1))
            passed = sum(t["outcome"] == "passed" for t in tests.values())
            loose = "" if args.loosen_equal is None else f", equal at rtol {args.loosen_equal}"
            print(f"\n## {suite} [{mode}{loose}]: {len(tests)} counted, {passed} pass", flush=True)
            for nodeid, t in tests.items():
                if t["outcome"] != "passed":
                    lines = t["message"].strip().splitlines()
                    print(f"- {t['outcome']} {nodeid}: {(lines[0] if lines else '')[:200]}")


if __name__ == "__main__":
    main()
