"""Every notebook under notebooks/ runs end to end in its small mode (JAXNORM_NOTEBOOK_SMALL=1).

The notebooks run in a Jupyter kernel subprocess (nbclient), with matplotlib's non-interactive Agg
backend, so nothing they warn about reaches this process's warnings-as-errors filter; a cell that
raises fails the test with the cell's traceback. Skipped when nbclient, nbformat or ipykernel is
not installed (they are test-only dependencies).
"""

import json
import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300


def test_notebooks_exist():
    names = [p.stem for p in NOTEBOOKS]
    for topic in (
        "activations",
        "initialization",
        "preprocessing",
        "batch_norm",
        "gradient_checking",
        "training_dynamics",
    ):
        assert any(topic in n for n in names), f"no notebook about {topic} in {names}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)

    # The kernel inherits this environment: small mode, a headless matplotlib backend, the
    # repository importable without an install (the notebook's pip cell must not run here).
    monkeypatch.setenv("JAXNORM_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    # A kernel spec first on JUPYTER_PATH, so the kernel is this interpreter (this venv), not a
    # "python3" kernel registered elsewhere on the machine.
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    workdir = tmp_path / "work"
    workdir.mkdir()
    # Keep the kernel's jax on the host CPU and out of other devices' memory in the test.
    monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))

    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(workdir)}},  # run from an empty folder
    )
    client.execute()

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "small mode: True" in text, "the set-up cell did not see JAXNORM_NOTEBOOK_SMALL=1"
    assert not any(o.get("output_type") == "error" for o in outputs)
