"""Run flax's own tests with jaxnorm's BatchNorm modules substituted inside the test modules only.

Fetched flax code is never committed: extract flax's tests at the installed version (0.12.8 is
commit 3a491108) outside the repository, then run this file as a script::

    mkdir -p /tmp/peer/flax
    git -C <flax git dir> archive 3a491108 tests pyproject.toml | tar -x -C /tmp/peer/flax
    python tools/peer_suites/flax_substitute.py /tmp/peer/flax --out /tmp/peer/results

It runs each suite (``SUITES``) once with flax's classes and once with jaxnorm's, every test file
in a process of its own (a test that fails inside an nnx transform can leave nnx's global
context behind for the next file), and prints per suite the tests counted (those that use
BatchNorm), how many pass, and each failure with its message; JSON reports go to ``--out``.

The substitution is a pytest plugin (this module, ``-p flax_substitute`` with this directory
on ``PYTHONPATH``). With ``--substitute=jaxnorm`` every test module under the rootdir that
imports ``flax``, ``flax.linen``, ``flax.linen.normalization`` or ``flax.nnx`` gets a proxy whose
``BatchNorm`` is ``jaxnorm.nn.BatchNorm`` / ``jaxnorm.nnx.BatchNorm`` and whose every other name is
flax's own object, so flax's internals and every class the tests subclass or check stay the real
ones. The proxies come from the test module's own ``__builtins__.__import__`` while the module is
executed, so names used at import time (``parameterized.parameters(nnx.BatchNorm, ...)``) are
substituted too. ``--substitute=jaxnorm-nnx`` (``jaxnorm-linen``) swaps only nnx's (linen's)
class, which makes flax's nnx-versus-linen equivalence tests compare jaxnorm with flax;
``--loosen-equal=RTOL`` turns the test modules' ``np.testing.assert_array_equal`` into
``assert_allclose(rtol=RTOL)`` to show that a bit-exact comparison holds to that tolerance.

A test is counted when it reads ``BatchNorm`` through a proxy while it runs, or when its
parameters name a ``BatchNorm`` class.
"""

from __future__ import annotations

import argparse
import builtins
import importlib.abc
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

# suite name -> test files (relative to the extracted flax checkout). The first three are the
# suites of issue 17; the last is the layer-metadata tests that parametrize over nnx.BatchNorm.
SUITES = {
    "flax linen BatchNorm tests": [
        "tests/linen/linen_test.py",
        "tests/linen/linen_module_test.py",
        "tests/linen/linen_transforms_test.py",
        "tests/linen/summary_test.py",
    ],
    "flax nnx normalization tests (linen and nnx swapped)": ["tests/nnx/nn/normalization_test.py"],
    "flax nnx tests using BatchNorm inside models": [
        "tests/nnx/transforms_test.py",
        "tests/nnx/integration_test.py",
        "tests/nnx/module_test.py",
        "tests/nnx/graph_utils_test.py",
        "tests/nnx/summary_test.py",
        "tests/nnx/helpers_test.py",
        "tests/nnx/bridge/wrappers_test.py",
    ],
    "flax nnx layer tests (linear_test, parametrized over nnx.BatchNorm)": [
        "tests/nnx/nn/linear_test.py"
    ],
}

_MODES = ("none", "jaxnorm", "jaxnorm-nnx", "jaxnorm-linen")
_STATE: dict = {"mode": "none", "current": None, "touched": set(), "outcomes": {}, "rtol": None}


def _substituted(module_name: str):
    """The class a proxy hands out for ``<module_name>.BatchNorm`` in the current mode."""
    real = sys.modules[module_name].BatchNorm
    mode = _STATE["mode"]
    if module_name == "flax.linen" and mode in ("jaxnorm", "jaxnorm-linen"):
        import jaxnorm.nn

        return jaxnorm.nn.BatchNorm
    if module_name == "flax.nnx" and mode in ("jaxnorm", "jaxnorm-nnx"):
        import jaxnorm.nnx

        return jaxnorm.nnx.BatchNorm
    return real


class _Proxy(types.ModuleType):
    """A module whose overridden names are computed and whose other names are the real module's."""

    def __init__(self, real, overrides):
        super().__init__(real.__name__, real.__doc__)
        object.__setattr__(self, "_real", real)
        object.__setattr__(self, "_overrides", overrides)

    def __getattr__(self, name):
        overrides = object.__getattribute__(self, "_overrides")
        if name in overrides:
            if name == "BatchNorm" and _STATE["current"] is not None:
                _STATE["touched"].add(_STATE["current"])
            return overrides[name]()
        return getattr(object.__getattribute__(self, "_real"), name)

    def __dir__(self):
        return sorted(set(dir(self._real)) | set(self._overrides))


_PROXIES: dict[str, types.ModuleType] = {}


def _assert_close_for_equal(actual, desired, err_msg="", verbose=True, *, strict=False):
    import numpy as np

    np.testing.assert_allclose(
        actual, desired, rtol=_STATE["rtol"], atol=0, equal_nan=True, err_msg=err_msg
    )


def _proxy(name: str) -> types.ModuleType:
    if not _PROXIES:
        import flax
        import flax.linen
        import flax.linen.normalization
        import flax.nnx
        import numpy
        import numpy.testing

        linen_bn = {"BatchNorm": lambda: _substituted("flax.linen")}
        _PROXIES["flax.linen.normalization"] = _Proxy(flax.linen.normalization, linen_bn)
        _PROXIES["flax.linen"] = _Proxy(
            flax.linen,
            {**linen_bn, "normalization": lambda: _PROXIES["flax.linen.normalization"]},
        )
        _PROXIES["flax.nnx"] = _Proxy(flax.nnx, {"BatchNorm": lambda: _substituted("flax.nnx")})
        _PROXIES["flax"] = _Proxy(
            flax, {"linen": lambda: _PROXIES["flax.linen"], "nnx": lambda: _PROXIES["flax.nnx"]}
        )
        if _STATE["rtol"] is not None:
            _PROXIES["numpy.testing"] = _Proxy(
                numpy.testing, {"assert_array_equal": lambda: _assert_close_for_equal}
            )
            _PROXIES["numpy"] = _Proxy(numpy, {"testing": lambda: _PROXIES["numpy.testing"]})
    return _PROXIES.get(name)


_real_import = builtins.__import__


def _substituting_import(name, globals=None, locals=None, fromlist=(), level=0):
    module = _real_import(name, globals, locals, fromlist, level)
    if level == 0:
        proxy = _proxy(getattr(module, "__name__", ""))
        if proxy is not None:
            return proxy
    return module


class _Loader(importlib.abc.Loader):
    """Executes a test module with an ``__import__`` that hands out the proxies."""

    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        table = dict(vars(builtins))
        table["__import__"] = _substituting_import
        module.__dict__["__builtins__"] = table
        self._inner.exec_module(module)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the loader of the test modules (``*_test.py`` under the rootdir)."""

    def __init__(self, root: Path):
        self._root = root

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.rsplit(".", 1)[-1].endswith("_test"):
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                if self._root in Path(spec.origin or "").parents and spec.loader is not None:
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def pytest_addoption(parser):
    group = parser.getgroup("flax_substitute")
    group.addoption("--substitute", choices=_MODES, default="none")
    group.addoption("--loosen-equal", type=float, default=None, metavar="RTOL")
    group.addoption("--peer-report", default=None, help="write per-test outcomes as JSON here")


def pytest_configure(config):
    _STATE["mode"] = config.getoption("--substitute")
    _STATE["rtol"] = config.getoption("--loosen-equal")
    sys.meta_path.insert(0, _Finder(Path(str(config.rootpath)).resolve()))


def _params_name_batchnorm(item) -> bool:
    callspec = getattr(item, "callspec", None)
    text = repr(callspec.params) if callspec is not None else ""
    text += str(getattr(getattr(item, "obj", None), "__x_params_repr__", ""))  # absl's
    return "BatchNorm" in text


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _STATE["current"] = item.nodeid
    try:
        return (yield)
    finally:
        _STATE["current"] = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    uses = item.nodeid in _STATE["touched"] or _params_name_batchnorm(item)
    report.user_properties.append(("uses_batchnorm", uses))
    return report


def pytest_runtest_logreport(report):
    # Also runs in the xdist controller: the worker's finding travels in user_properties.
    uses = dict(report.user_properties).get("uses_batchnorm", False)
    entry = _STATE["outcomes"].setdefault(
        report.nodeid, {"outcome": "passed", "message": "", "uses": False}
    )
    entry["uses"] = entry["uses"] or uses
    if report.failed:
        entry["outcome"] = "failed" if report.when == "call" else "error"
        crash = getattr(report.longrepr, "reprcrash", None)
        entry["message"] = (crash.message if crash else str(report.longrepr))[:600]
    elif report.skipped and entry["outcome"] == "passed":
        entry["outcome"] = "skipped"


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput"):
        return  # an xdist worker: the controller reports
    rows = {
        nodeid: {"outcome": e["outcome"], "message": e["message"]}
        for nodeid, e in sorted(_STATE["outcomes"].items())
        if e["uses"]
    }
    summary = {
        "substitute": _STATE["mode"],
        "loosen_equal": _STATE["rtol"],
        "counted": len(rows),
        "passed": sum(e["outcome"] == "passed" for e in rows.values()),
        "tests": rows,
    }
    path = session.config.getoption("--peer-report")
    if path:
        Path(path).write_text(json.dumps(summary, indent=1))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(
            f"flax_substitute[{_STATE['mode']}]: {summary['counted']} tests use BatchNorm, "
            f"{summary['passed']} pass"
        )


# ------------------------------------------------------------------------------------ runner


def _run_file(flax_dir: Path, test_file: str, mode: str, report: Path, extra: list[str]) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parent), env.get("PYTHONPATH")])
    )
    # As flax's tests/run_all_tests.sh runs them.
    env.update(JAX_NUMPY_RANK_PROMOTION="raise", FLAX_PROFILE="1")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    command = [
        sys.executable, "-m", "pytest", "-q", "-p", "flax_substitute", "-p", "no:cacheprovider",
        f"--substitute={mode}", f"--peer-report={report}", *extra, test_file,
    ]  # fmt: skip
    subprocess.run(command, cwd=flax_dir, env=env, check=False, capture_output=True)
    return json.loads(report.read_text())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("flax_dir", type=Path, help="the extracted flax checkout (tests/ in it)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/peer/results"))
    parser.add_argument("--modes", default="none,jaxnorm")
    parser.add_argument("--suite", action="append", help="a suite name (default: all)")
    parser.add_argument("--workers", default="2", help="pytest-xdist -n (0: no xdist)")
    parser.add_argument("--loosen-equal", type=float, default=None, metavar="RTOL")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    extra = ["-n", args.workers] if args.workers != "0" else []
    if args.loosen_equal is not None:
        extra.append(f"--loosen-equal={args.loosen_equal}")
    for suite, files in SUITES.items():
        if args.suite and suite not in args.suite:
            continue
        for mode in args.modes.split(","):
            tests: dict = {}
            for test_file in files:
                name = f"{Path(test_file).stem}-{mode}.json"
                tests.update(
                    _run_file(args.flax_dir, test_file, mode, args.out / name, extra)["tests"]
                )
            passed = sum(t["outcome"] == "passed" for t in tests.values())
            print(f"\n## {suite} [{mode}]: {len(tests)} counted, {passed} pass")
            for nodeid, t in tests.items():
                if t["outcome"] != "passed":
                    first = t["message"].strip().splitlines()[0] if t["message"] else ""
                    print(f"- {t['outcome']} {nodeid}: {first[:200]}")
            (args.out / f"{suite.split(' (')[0].replace(' ', '_')}-{mode}.json").write_text(
                json.dumps({"suite": suite, "mode": mode, "tests": tests}, indent=1)
            )


if __name__ == "__main__":
    main()
