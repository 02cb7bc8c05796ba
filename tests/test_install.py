"""The editable install is not shadowed by the folder that holds the clone (issue 19, part 5).

After ``git clone ... jaxnorm && pip install -e jaxnorm``, a script run from the folder above the
clone has that folder first on ``sys.path``, and there ``jaxnorm/`` (the clone's root, no
``__init__.py``) is a namespace package. With setuptools' import-hook editable install the
namespace package won (``AttributeError: module 'jaxnorm' has no attribute 'gelu'``); the
path-based install that pyproject.toml's ``package-dir`` selects puts the checkout on ``sys.path``,
where the real package wins.
"""

import importlib.metadata
import os
import pathlib
import subprocess
import sys

import pytest


def test_a_folder_named_jaxnorm_next_to_the_script_does_not_shadow_the_package(tmp_path):
    try:
        importlib.metadata.distribution("jaxnorm")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("jaxnorm is not installed (imported through PYTHONPATH only)")
    (tmp_path / "jaxnorm").mkdir()  # the clone's root as Python sees it: no __init__.py
    (tmp_path / "jaxnorm" / "README.md").write_text("a clone\n")
    script = tmp_path / "script.py"
    script.write_text("import jaxnorm\nprint(jaxnorm.__file__)\nprint(jaxnorm.gelu(1.0))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the install alone
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    origin = pathlib.Path(proc.stdout.splitlines()[0])
    assert origin.name == "__init__.py", proc.stdout  # a regular package, not a namespace
    assert origin.parent.parent.resolve() != tmp_path.resolve(), proc.stdout
