"""The README's tour and examples/quickstart.py run as a user runs them (a subprocess)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run_script(script, cwd):
    """Run a Python file in a fresh interpreter on the CPU, as a user runs it; it must succeed."""
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=cwd,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_quickstart_runs():
    stdout = _run_script(ROOT / "examples" / "quickstart.py", ROOT)
    # Its last section trains a model and prints the test accuracy of every epoch.
    last = [line for line in stdout.splitlines() if "test accuracy" in line][-1]
    assert float(last.rsplit(" ", 1)[1]) > 0.9, stdout[-2000:]


def test_readme_tour_runs(tmp_path):
    # The "short tour" block, pasted into a fresh interpreter: every name it uses is defined.
    readme = (ROOT / "README.md").read_text()
    tour = re.search(r"## A short tour\n\n```python\n(.*?)```", readme, re.S)
    assert tour is not None, "README.md has no '## A short tour' python block"
    script = tmp_path / "tour.py"
    script.write_text(tour.group(1))
    stdout = _run_script(script, tmp_path)
    assert "ok" in stdout  # the gradient-check table it prints
