"""The course notebooks (notebooks/*.ipynb) run top to bottom, headless, and match their sources.

Each notebook is executed in a fresh kernel with nbclient, the way a student's Jupyter would run it
(working directory notebooks/), in memory: the committed files are not rewritten. A cell that raises
fails the test with the cell and its traceback. The four demonstrations run as committed; the labs
(NN_lab_*, committed as the student's version: stubs, and checks that say "not done yet") run solved,
with each exercise's solution cell in place of its stub, and every check must print "pass".
"""

import os
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))
import build  # noqa: E402  notebooks/build.py: the sources and the kernel name

NAMES = sorted(p.stem for p in (NOTEBOOKS / "src").glob("*.py"))
LABS = [name for name in NAMES if build.has_exercises(NOTEBOOKS / "src" / f"{name}.py")]
CELL_TIMEOUT = 600  # seconds per cell; the notebooks aim at ~1 minute each on two idle cores


def test_every_source_has_a_notebook():
    assert len(NAMES) == 8 and len(LABS) == 4  # 4 demonstrations, 4 labs (exercises with check cells)
    assert all("_lab_" in name for name in LABS)
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == NAMES


def test_every_lab_has_its_checks_module():
    """Lab NN_lab_X grades its exercises with notebooks/checks_NN_X.py (which ones, in which order: the
    tests of each checks module); what the four share is checks_common.py."""
    modules = {p.stem for p in NOTEBOOKS.glob("checks_*.py")}
    assert modules == {"checks_common"} | {f"checks_{name.replace('_lab_', '_', 1)}" for name in LABS}


def check_outputs(nb):
    """The one line each check cell of a lab printed (its Verdict's repr)."""
    return [
        "".join(o.get("data", {}).get("text/plain", "") for o in c.outputs).strip()
        for c in nb.cells
        if "check" in c.metadata.get("tags", [])
    ]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_matches_source_and_has_outputs(name):
    """The committed notebook is its source rebuilt (run `python notebooks/build.py` after an edit), with
    the outputs of a run stored: every code cell ran and the plots are there."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    src = build.make_notebook(NOTEBOOKS / "src" / f"{name}.py")
    assert [(c.cell_type, c.source) for c in nb.cells] == [(c.cell_type, c.source) for c in src.cells], (
        f"{name}.ipynb is out of date with src/{name}.py: run python notebooks/build.py {name[:2]}"
    )
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), f"{name}.ipynb has cells that were never run"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"], (
        f"{name}.ipynb stores an error"
    )
    if name in LABS:  # the student's version: every check says its exercise is not done
        verdicts = check_outputs(nb)
        assert verdicts and all(v.startswith("not done yet") for v in verdicts), verdicts
        return
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, f"{name}.ipynb stores no plot"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name):
    if name in LABS:  # solved: the solution cells (the project's code) in place of the stubs
        nb = build.make_notebook(NOTEBOOKS / "src" / f"{name}.py", solutions=True)
    else:
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    # One extra cell, in memory only: which Python environment the kernel runs (it must be this one).
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT, kernel_name=build.KERNEL, resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    start = time.time()
    client.execute()  # raises CellExecutionError (with the cell and traceback) if any cell fails
    print(f"{name}: {time.time() - start:.0f} s")
    kernel_prefix = nb.cells[-1].outputs[0]["text"].strip()
    assert os.path.realpath(kernel_prefix) == os.path.realpath(sys.prefix), (
        f"the notebooks ran in the Python environment {kernel_prefix}, not in this one ({sys.prefix})"
    )
    if name in LABS:
        verdicts = check_outputs(nb)
        assert verdicts and all(v.startswith("pass") for v in verdicts), verdicts


def test_an_exercise_needs_its_solution_right_after_it(tmp_path):
    src = tmp_path / "09_lab_x.py"
    src.write_text('# %% tags=["exercise"]\ndef f():\n    raise NotImplementedError\n\n# %%\nf = 1\n')
    with pytest.raises(ValueError, match="has no solution cell after it"):
        build.read_cells(src)
    src.write_text(
        '# %% tags=["exercise"]\ndef f():\n    raise NotImplementedError\n\n# %% tags=["solution"]\nf = 1\n'
    )
    student, solved = build.make_notebook(src), build.make_notebook(src, solutions=True)
    assert [c.source for c in student.cells] == ["def f():\n    raise NotImplementedError"]
    assert [c.source for c in solved.cells] == ["f = 1"] and solved.cells[0].metadata.tags == ["solution"]
