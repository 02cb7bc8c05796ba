"""Where the test suite's time goes: JAX programs compiled, per program name, test and file.

The suite is compile-bound on CPU (thousands of small programs), so this is the profile to read
before trying to make it faster. Run it from the repository root with pytest's own arguments:

    python tools/compile_profile.py                      # the whole default suite
    python tools/compile_profile.py tests/test_batchnorm.py -n 0
    python tools/compile_profile.py --top 40 -- -m slow  # options of this script before ``--``

It runs pytest with this file as a plugin (in every xdist worker) and with ``jax_log_compiles``
on, reads JAX's log records as they are emitted, and prints, per program name, test and file:
how many programs were compiled, how many of them the persistent compilation cache served, and
the seconds spent in XLA compilation and in lowering (jaxpr to MLIR). A program the persistent
cache serves is lowered again but not compiled: its "XLA" time is the cache read. For a profile
of an empty cache (CI's case), point ``JAX_COMPILATION_CACHE_DIR`` at a new folder, or delete
the default one first (tests/conftest.py).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

_OUT = "JAXNORM_COMPILE_PROFILE_DIR"
_COMPILED = re.compile(r"Finished XLA compilation of (.*) in ([\d.e+-]+) sec")
_LOWERED = re.compile(r"Finished jaxpr to MLIR module conversion (.*) in ([\d.e+-]+) sec")
_HIT = re.compile(r"Persistent compilation cache hit for '(.*?)'")
_FIELDS = ("programs", "cache_hits", "xla_s", "lower_s")


class _Recorder(logging.Handler):
    """Accumulates compile events per (program name, test id) in this process."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.rows = collections.defaultdict(lambda: [0, 0, 0.0, 0.0])

    def emit(self, record):
        message = record.getMessage()
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        if m := _COMPILED.match(message):
            row = self.rows[(m.group(1), test)]
            row[0] += 1
            row[2] += float(m.group(2))
        elif m := _LOWERED.match(message):
            self.rows[(m.group(1), test)][3] += float(m.group(2))
        elif m := _HIT.match(message):
            self.rows[(f"jit({m.group(1).removeprefix('jit_')})", test)][1] += 1


_recorder: _Recorder | None = None


def pytest_configure(config):
    global _recorder
    if os.environ.get(_OUT) is None or _recorder is not None:
        return
    import jax

    jax.config.update("jax_log_compiles", True)
    _recorder = _Recorder()
    # The records are handled here and not passed on: with jax_log_compiles they are warnings,
    # which would otherwise reach stderr by the thousand.
    for name in ("jax._src.dispatch", "jax._src.interpreters.pxla", "jax._src.compiler"):
        logger = logging.getLogger(name)
        logger.addHandler(_recorder)
        logger.propagate = False


def pytest_unconfigure(config):
    if _recorder is None:
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    rows = [[name, test, *row] for (name, test), row in _recorder.rows.items()]
    Path(os.environ[_OUT], f"{worker}.json").write_text(json.dumps(rows))


def _table(title, totals, top):
    print(f"\n{title} (top {top} by XLA + lowering seconds)")
    print(f"{'programs':>8} {'cached':>6} {'XLA s':>7} {'lower s':>7}  name")
    ranked = sorted(totals.items(), key=lambda kv: -(kv[1][2] + kv[1][3]))
    for key, (n, hits, xla, lower) in ranked[:top]:
        print(f"{n:8d} {hits:6d} {xla:7.1f} {lower:7.1f}  {key or '(outside a test)'}")


def _report(rows, top):
    by = {k: collections.defaultdict(lambda: [0, 0, 0.0, 0.0]) for k in ("name", "test", "file")}
    total = [0, 0, 0.0, 0.0]
    for name, test, *values in rows:
        keys = {"name": name, "test": test.split("[")[0], "file": test.split("::")[0]}
        for kind, key in keys.items():
            for i, v in enumerate(values):
                by[kind][key][i] += v
        for i, v in enumerate(values):
            total[i] += v
    n, hits, xla, lower = total
    print(
        f"{n} programs ({hits} served by the persistent cache): {xla:.0f} s of XLA compilation, "
        f"{lower:.0f} s of lowering, summed over the workers"
    )
    _table("By file", by["file"], top)
    _table("By test", by["test"], top)
    _table("By program", by["name"], top)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, pytest_args = (
        (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else ([], argv)
    )
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--top", type=int, default=25, help="rows per table")
    options = parser.parse_args(ours)
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, **{_OUT: out})
        here = str(Path(__file__).resolve().parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "pytest", "-p", Path(__file__).stem, *pytest_args]
        code = subprocess.call(command, env=env)
        rows = [row for f in sorted(Path(out).glob("*.json")) for row in json.loads(f.read_text())]
    if not rows:
        print("no compile events were recorded", file=sys.stderr)
        return code or 1
    _report(rows, options.top)
    return code


if __name__ == "__main__":
    sys.exit(main())
