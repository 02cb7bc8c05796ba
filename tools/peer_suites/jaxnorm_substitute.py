"""Run a peer's own tests (jax, flax) with jaxnorm's objects substituted in the test modules only.

A pytest plugin. Fetched peer code is never committed; see README.md next to this file and
docs/peer_suites.md for the recipe. From the root of an extracted peer test tree::

    PYTHONPATH=/path/to/jaxnorm/tools/peer_suites python -m pytest -p jaxnorm_substitute \\
        --substitute=jaxnorm --peer-report=/tmp/report.json tests/nn_test.py

How the substitution stays local. Every test module (a file under the rootdir, or under
``--substitute-root``, whose name matches pytest's ``python_files``) is executed with its own
``__builtins__``, whose ``__import__`` hands out proxies for ``jax``, ``jax.nn``,
``jax.nn.initializers``, ``flax``, ``flax.linen``, ``flax.nnx`` (and the submodules on the way to a
substituted name). A proxy returns the substitute for the names in the table below and the real
module's object for every other name. ``from jax import nn``, ``import jax`` then
``jax.nn.relu``, ``import flax.linen as nn`` and imports inside test functions all go through it;
names captured at import time (``parameterized.parameters(nn.relu, ...)``, jax's initializer
records) are substituted too. Nothing is patched in ``jax`` or ``flax`` themselves: flax's
internals, jax's test utilities and every other module keep calling the real ``jax.nn``.

``--substitute=jaxnorm`` hands out jaxnorm's objects; ``--substitute=none`` hands out the peer's own
objects through the same proxies and recorders (the baseline run, so that both runs count the same
tests). ``--substitute-groups`` picks the groups (default: all of them):

=============  ==============================================  ===============================
group          names (in the peer module)                      substitute
=============  ==============================================  ===============================
activations    ``jax.nn.{elu, gelu, leaky_relu, relu, selu,    ``jaxnorm.activations.<name>``
               sigmoid, silu, softplus, tanh}``
initializers   ``jax.nn.initializers.{he_normal, he_uniform,   ``jaxnorm.initializers.<name>``
               lecun_normal, lecun_uniform, orthogonal,
               xavier_normal, xavier_uniform}``
linen          ``flax.linen.BatchNorm``                         ``jaxnorm.nn.BatchNorm``
               (also ``flax.linen.normalization.BatchNorm``)
nnx            ``flax.nnx.BatchNorm``                           ``jaxnorm.nnx.BatchNorm``
               (also ``flax.nnx.nn.normalization.BatchNorm``)
=============  ==============================================  ===============================

Only names that jaxnorm defines with the peer's parameter names are listed: jax's aliases
``glorot_*`` and ``kaiming_*`` are not jaxnorm names and stay jax's.

Counting. A test is *counted* for a group when, while it runs, it calls a substituted function
(an activation, an initializer factory or the ``init`` one returns) or reads a substituted class
through a proxy, or when its pytest parameters name a substituted class. Functions are wrapped in
a recorder that only notes the call (in both modes), classes are handed out unwrapped (so
``isinstance``, subclassing and flax's graph registry see the real class). ``--peer-report``
writes, per counted test, its outcome (``passed``/``failed``/``skipped``/``error``), the groups it
used and the first line of the failure; ``run.py`` next to this file runs both modes and compares.
"""

from __future__ import annotations

import builtins
import fnmatch
import functools
import importlib
import importlib.abc
import inspect
import json
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest

# group -> (peer module, names, substitute module, other peer modules holding the same names)
GROUPS: dict[str, tuple[str, tuple[str, ...], str, tuple[str, ...]]] = {
    "activations": (
        "jax.nn",
        ("elu", "gelu", "leaky_relu", "relu", "selu", "sigmoid", "silu", "softplus", "tanh"),
        "jaxnorm.activations",
        (),
    ),
    "initializers": (
        "jax.nn.initializers",
        (
            "he_normal",
            "he_uniform",
            "lecun_normal",
            "lecun_uniform",
            "orthogonal",
            "xavier_normal",
            "xavier_uniform",
        ),
        "jaxnorm.initializers",
        (),
    ),
    "linen": ("flax.linen", ("BatchNorm",), "jaxnorm.nn", ("flax.linen.normalization",)),
    "nnx": ("flax.nnx", ("BatchNorm",), "jaxnorm.nnx", ("flax.nnx.nn.normalization",)),
}

_STATE: dict = {"mode": "none", "current": None, "used": {}, "outcomes": {}}


def _record(group: str) -> None:
    if _STATE["current"] is not None:
        _STATE["used"].setdefault(_STATE["current"], set()).add(group)


def _recording(fn: Callable, group: str, *, factory: bool) -> Callable:
    """``fn`` unchanged but for a note that the running test called it (an init factory's
    ``init`` is wrapped too, since jax's tests build initializers at import and call them later)."""

    @functools.wraps(fn, updated=())
    def wrapper(*args, **kwargs):
        _record(group)
        out = fn(*args, **kwargs)
        return _recording(out, group, factory=False) if factory and callable(out) else out

    return wrapper


def _check_signature(peer: Callable, ours: Callable, where: str) -> None:
    """Refuse to substitute a function that lacks a parameter name of the peer's."""
    try:
        theirs = inspect.signature(peer).parameters
        mine = inspect.signature(ours).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in mine.values()):
        return
    missing = [n for n, p in theirs.items() if p.kind is not p.VAR_POSITIONAL and n not in mine]
    if missing:
        raise pytest.UsageError(
            f"jaxnorm_substitute: {where} lacks the peer's parameters {missing}"
        )


class _Proxy(types.ModuleType):
    """A module that answers the substituted names itself and every other name from the real one."""

    def __init__(self, real: types.ModuleType, table: dict[str, tuple[str, object]]):
        super().__init__(real.__name__, real.__doc__)
        object.__setattr__(self, "_real", real)
        object.__setattr__(self, "_table", table)

    def __getattr__(self, name):
        table = object.__getattribute__(self, "_table")
        if name in table:
            group, value = table[name]
            if isinstance(value, type):
                _record(group)
            return value
        value = getattr(object.__getattribute__(self, "_real"), name)
        if isinstance(value, types.ModuleType) and value.__name__ in _PROXIED:
            return _proxy(value)
        return value

    def __dir__(self):
        return sorted(set(dir(object.__getattribute__(self, "_real"))) | set(self._table))

    def __repr__(self):
        return f"<jaxnorm_substitute proxy of {object.__getattribute__(self, '_real')!r}>"


_PROXIED: dict[str, dict[str, tuple[str, object]]] = {}  # module name -> its table ({} = a parent)
_PROXIES: dict[str, _Proxy] = {}


def _build_tables(groups: list[str], mode: str) -> None:
    _PROXIED.clear()
    _PROXIES.clear()
    for group in groups:
        peer_name, names, ours_name, aliases = GROUPS[group]
        peer = importlib.import_module(peer_name)
        ours = importlib.import_module(ours_name) if mode == "jaxnorm" else None
        for module_name in (peer_name, *aliases):
            importlib.import_module(module_name)
            table = _PROXIED.setdefault(module_name, {})
            for name in names:
                real = getattr(peer, name)
                value = real if ours is None else getattr(ours, name)
                if ours is not None and not isinstance(value, type):
                    _check_signature(real, value, f"{ours_name}.{name}")
                if not isinstance(value, type):
                    value = _recording(value, group, factory=group == "initializers")
                table[name] = (group, value)
            parts = module_name.split(".")
            for i in range(1, len(parts)):
                _PROXIED.setdefault(".".join(parts[:i]), {})


def _proxy(module: types.ModuleType) -> _Proxy:
    name = module.__name__
    if name not in _PROXIES:
        _PROXIES[name] = _Proxy(module, _PROXIED[name])
    return _PROXIES[name]


_real_import = builtins.__import__


def _substituting_import(name, globals=None, locals=None, fromlist=(), level=0):
    module = _real_import(name, globals, locals, fromlist, level)
    if isinstance(module, types.ModuleType) and module.__name__ in _PROXIED:
        return _proxy(module)
    return module


class _Loader(importlib.abc.Loader):
    """The peer's loader (pytest's assertion rewriter, usually), run with substituting builtins."""

    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        table = dict(vars(builtins))
        table["__import__"] = _substituting_import
        # exec() keeps a module's own __builtins__: every import statement in the module, at its
        # top level or inside its functions, goes through _substituting_import.
        module.__dict__["__builtins__"] = table
        self._inner.exec_module(module)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the loader of the test modules under the substitution roots."""

    def __init__(self, roots: list[Path], patterns: list[str]):
        self._roots = roots
        self._patterns = patterns

    def _is_test_module(self, origin: str | None) -> bool:
        if not origin:
            return False
        path = Path(origin).resolve()
        if not any(fnmatch.fnmatch(path.name, p) for p in self._patterns):
            return False
        return any(root == path.parent or root in path.parents for root in self._roots)

    def find_spec(self, fullname, path=None, target=None):
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is None:
                continue
            if spec.loader is not None and self._is_test_module(spec.origin):
                spec.loader = _Loader(spec.loader)
                return spec
            return None  # not a test module: let the import system proceed as usual
        return None


def pytest_addoption(parser):
    group = parser.getgroup("jaxnorm_substitute")
    group.addoption(
        "--substitute",
        choices=("none", "jaxnorm"),
        default="none",
        help="objects the proxies hand out: the peer's own (none, the baseline) or jaxnorm's",
    )
    group.addoption(
        "--substitute-groups",
        default=",".join(GROUPS),
        help=f"comma-separated groups to substitute (default all: {','.join(GROUPS)})",
    )
    group.addoption(
        "--substitute-root",
        action="append",
        default=[],
        help="directory whose test modules get the proxies (repeatable; default the rootdir)",
    )
    group.addoption("--peer-report", default=None, help="write per-test outcomes as JSON here")


def pytest_configure(config):
    groups = [g for g in config.getoption("substitute_groups").split(",") if g]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise pytest.UsageError(f"--substitute-groups: unknown {unknown}; known: {list(GROUPS)}")
    _STATE["mode"] = config.getoption("--substitute")
    _STATE["groups"] = groups
    _build_tables(groups, _STATE["mode"])
    roots = config.getoption("substitute_root") or [str(config.rootpath)]
    patterns = list(config.getini("python_files"))
    finder = _Finder([Path(r).resolve() for r in roots], patterns)
    sys.meta_path.insert(0, finder)
    _STATE["finder"] = finder


def pytest_unconfigure(config):
    finder = _STATE.pop("finder", None)
    if finder in sys.meta_path:
        sys.meta_path.remove(finder)


def _groups_in_params(item) -> set[str]:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return set()
    values = list(callspec.params.values())
    return {
        group
        for group in _STATE["groups"]
        for table in _PROXIED.values()
        for g, value in table.values()
        if g == group and isinstance(value, type) and any(v is value for v in values)
    }


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
    used = _STATE["used"].get(item.nodeid, set()) | _groups_in_params(item)
    report.user_properties.append(("substitute_groups", sorted(used)))
    return report


def pytest_runtest_logreport(report):
    # Runs in the controller under xdist too: the worker's record travels in user_properties.
    used = dict(report.user_properties).get("substitute_groups", [])
    entry = _STATE["outcomes"].setdefault(
        report.nodeid, {"outcome": "passed", "message": "", "groups": set()}
    )
    entry["groups"].update(used)
    if report.failed:
        entry["outcome"] = "failed" if report.when == "call" else "error"
        crash = getattr(report.longrepr, "reprcrash", None)
        entry["message"] = (crash.message if crash else str(report.longrepr))[:400]
    elif report.skipped and entry["outcome"] == "passed":
        entry["outcome"] = "skipped"


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput"):
        return  # an xdist worker: the controller reports
    rows = {
        nodeid: {"outcome": e["outcome"], "message": e["message"], "groups": sorted(e["groups"])}
        for nodeid, e in sorted(_STATE["outcomes"].items())
        if e["groups"]
    }
    summary = {
        "substitute": _STATE["mode"],
        "groups": _STATE["groups"],
        "counted": len(rows),
        "passed": sum(r["outcome"] == "passed" for r in rows.values()),
        "tests": rows,
    }
    path = session.config.getoption("--peer-report")
    if path:
        Path(path).write_text(json.dumps(summary, indent=1))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(
            f"jaxnorm_substitute[{_STATE['mode']}]: {summary['counted']} tests counted, "
            f"{summary['passed']} pass"
        )
