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


def _code(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    return [c.source for c in nb.cells if c.cell_type == "code"], [
        c.source for c in nb.cells if c.cell_type == "markdown"
    ]


def test_notebook_06_prints_a_one_rate_range_as_one_value():
    """The scan's ranges: [10, 10] reads as 10 (the function is the notebook's own)."""
    import ast

    pytest.importorskip("nbformat")
    code, _ = _code(ROOT / "notebooks" / "06_training_dynamics.ipynb")
    cell = next(c for c in code if "def fmt_range" in c)
    tree = ast.parse(cell.replace("%pip", "#"))
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "fmt_range")
    namespace = {}
    exec(compile(ast.Module([func], []), "fmt_range", "exec"), namespace)
    fmt_range = namespace["fmt_range"]
    assert fmt_range((10.0, 10.0)) == "10"
    assert fmt_range((1e-3, 1.0)) == "[0.001, 1]"
    assert fmt_range(None) == "none"
    assert "print(scan)" not in cell


def test_notebook_06_never_tells_a_converged_run_to_raise_the_learning_rate():
    pytest.importorskip("nbformat")
    code, _ = _code(ROOT / "notebooks" / "06_training_dynamics.ipynb")
    cell = next(c for c in code if "check_update_ratios" in c and "histories" in c)
    # The last step's ratio is judged only while the run still learns.
    assert "converged" in cell and "still learning" in cell
    assert "r[-1], hist.update_ratio)\n    print(" not in cell


def test_notebook_01_uses_the_labs_table_and_no_unreproduced_speed_claim():
    import re

    pytest.importorskip("nbformat")
    code, markdown = _code(ROOT / "notebooks" / "01_activations.ipynb")
    assert any('lab.EXPERIMENTS["activations"].table' in c for c in code)
    text = "\n".join(markdown)
    assert not re.search(r"\b(6|six)\s*(x|×|times)\b", text, re.IGNORECASE)
    assert "does **not** reproduce" in text
