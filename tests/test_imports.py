"""The project's modules import each other as a chain: no cycle, every import at the top of its file."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODULES = sorted(p.stem for p in REPO.glob("*.py"))  # the flat top-level modules


def project_imports(path):
    """(names of project modules imported at module level, imports found anywhere below module level)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = (
                [a.name.split(".")[0] for a in node.names]
                if isinstance(node, ast.Import)
                else [(node.module or "").split(".")[0]]
            )
            ours = [n for n in names if n in MODULES]
            if node in tree.body:
                top.update(ours)
            else:
                nested.append((node.lineno, ", ".join(names)))
    return top, nested


GRAPH = {m: project_imports(REPO / f"{m}.py") for m in MODULES}
# The one import below module level: transformers, a runtime dependency of hf.py alone (the adapter that runs the
# policies inside a transformers model), imported on first use so that the project, evaluate.py included, imports
# and runs without it (test_evaluate_imports_and_refuses_the_engine_without_transformers).
OPTIONAL = {"hf": ["transformers"]}


@pytest.mark.parametrize("module", MODULES)
def test_every_import_is_at_the_top(module):
    nested = [names for _, names in GRAPH[module][1]]
    assert nested == OPTIONAL.get(module, []), (
        f"{module}.py imports inside a function or block: {GRAPH[module][1]}"
    )


def test_import_graph_has_no_cycle():
    graph = {m: GRAPH[m][0] for m in MODULES}
    state = {}  # module -> "open" while on the DFS stack, "done" after

    def visit(m, path):
        if state.get(m) == "open":
            cycle = path[path.index(m) :] + [m]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if state.get(m) == "done":
            return
        state[m] = "open"
        for n in sorted(graph[m]):
            visit(n, path + [m])
        state[m] = "done"

    for m in MODULES:
        visit(m, [])
    assert graph["files"] == set(), "files.py must import nothing of the project"
    assert {"kvcache"} <= graph["model"] and {"landmarks", "quantize", "offload"} <= graph["kvcache"]
    assert graph["ruler"] == {"files", "tasks", "text2json"} and "ruler" in graph["results"]
    assert {"kvcache", "model", "skew"} <= graph["hf"] and "hf" in graph["evaluate"]
    # the experiment reads without the process machinery, the results folder or the plots; the workers run it
    assert graph["experiment"] & {"evaluate", "workers", "sweep", "claims", "results", "hf"} == set()
    assert "experiment" in graph["workers"] and "evaluate" not in graph["workers"]
    assert {"experiment", "workers", "sweep"} <= graph["evaluate"] and "evaluate" not in graph["sweep"]


def test_core_modules_import_in_a_fresh_interpreter():
    run = subprocess.run(
        [sys.executable, "-c", "import model, kvcache, landmarks, offload, quantize"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr


def test_the_experiment_imports_without_the_process_machinery():
    """`import experiment` in a fresh interpreter (a notebook, a benchmark) loads none of the modules that run
    processes, write results or draw: not workers, evaluate, claims, results, hf, nor matplotlib."""
    apart = ("workers", "evaluate", "sweep", "claims", "results", "hf", "transformers", "matplotlib")
    code = f"import sys, experiment; print(*[m for m in {apart!r} if m in sys.modules])"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [], f"import experiment loads {run.stdout.strip()}"


def test_evaluate_imports_and_refuses_the_engine_without_transformers(tmp_path):
    """transformers hidden (an import of it fails, as where it is not installed): evaluate.py and hf.py import, the
    default engine needs nothing of it, and --engine transformers is one line before any work."""
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import evaluate, hf\n"
        "assert not hf.available() and 'transformers' not in [m for m in sys.modules if sys.modules[m]]\n"
        f"sys.exit(evaluate.main(['--engine', 'transformers', '--n', '1', '--out', {str(tmp_path / 'out')!r}]))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert (
        run.stderr
        == "error: --engine transformers needs the transformers package: pip install transformers\n"
    )
    assert not (tmp_path / "out").exists()


def test_what_a_policy_is_comes_before_what_it_does():
    """policy.py (the parts, the presets, the budget split) needs only the landmark kinds and the formats;
    kvcache.py (the caches, the decode step) builds on it and on tracking.py (the statistics against the
    oracle), which needs only the landmarks' scoring."""
    assert GRAPH["policy"][0] == {"landmarks", "quantize"}
    assert GRAPH["tracking"][0] == {"landmarks"}
    assert {"policy", "tracking", "landmarks", "offload"} <= GRAPH["kvcache"][0]
    assert "kvcache" not in GRAPH["landmarks"][0] | GRAPH["policy"][0]
