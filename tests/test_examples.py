"""The README's one-page tour, examples/quickstart.py, runs as a user runs it (a subprocess)."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quickstart_runs():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Its last section trains a model and prints the test accuracy of every epoch.
    last = [line for line in proc.stdout.splitlines() if "test accuracy" in line][-1]
    assert float(last.rsplit(" ", 1)[1]) > 0.9, proc.stdout[-2000:]
