"""Build the course notebooks from their sources in notebooks/src/, and run them so outputs are stored.

    python notebooks/build.py                 # all notebooks: build, execute, write notebooks/NN_*.ipynb
    python notebooks/build.py 03 04           # only the notebooks whose name starts with 03 or 04
    python notebooks/build.py --no-execute    # write them without outputs
    python notebooks/build.py --solutions     # the labs solved, for an instructor: notebooks/solutions/

Why sources: a notebook's JSON is hard to review and to diff, so each notebook is written as a plain
Python file in the "percent" format (as jupytext reads it): a line `# %%` starts a code cell,
`# %% [markdown]` a markdown cell whose lines are comments. This script turns them into .ipynb with
nbformat and executes them with nbclient in the project's Python (the kernel named python3 of the
environment this script runs in), with notebooks/ as the working directory.

The labs (NN_lab_*) have exercises. A code cell may carry tags, as jupytext writes them:
`# %% tags=["exercise"]` is a stub the student completes, and the cell right after it,
`# %% tags=["solution"]`, is its solution (the project's own code); `# %% tags=["check"]` grades it
(lab NN_lab_X's checks are in notebooks/checks_NN_X.py). notebooks/NN_*.ipynb is the student's version:
the stubs, and the checks' outputs saying they are not done. With --solutions the solution cells replace
the stubs and the notebooks go to notebooks/solutions/ (not committed; tests/test_notebooks.py executes
the solved labs in memory).
"""

import argparse
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "src"
SOLVED = HERE / "solutions"  # where --solutions writes the solved labs (.gitignore'd)
TAGS = ("exercise", "solution", "check")  # the cell tags a source may use
KERNEL = "python3"
CELL_TIMEOUT = 600  # seconds per cell; each whole notebook is meant to run in well under 3 minutes


def _tags(path, header):
    """The tags of a cell header line: '# %% tags=["exercise"]' -> ("exercise",)."""
    m = re.search(r"tags=\[([^\]]*)\]", header)
    tags = tuple(re.findall(r'"([^"]*)"', m.group(1))) if m else ()
    unknown = set(tags) - set(TAGS)
    if unknown:
        raise ValueError(f"{path}: unknown cell tag(s) {sorted(unknown)} in {header!r}; use {TAGS}")
    return tags


def read_cells(path):
    """Cells of a percent-format source: a list of (kind, text, tags), kind "code" or "markdown".

    An exercise cell must be followed by its solution cell, and a solution cell must follow one.
    """
    cells, kind, tags, lines = [], None, (), []

    def flush():
        text = "\n".join(lines).strip("\n")
        if kind is not None and text.strip():
            cells.append((kind, text, tags))

    for line in Path(path).read_text().splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
            tags = _tags(path, line)
        elif kind == "markdown":
            if line and not line.startswith("#"):
                raise ValueError(f"{path}: markdown line without '#': {line!r}")
            lines.append(line[2:] if line.startswith("# ") else line[1:])
        elif kind == "code":
            lines.append(line)
        elif line.strip() and not line.startswith("#"):
            raise ValueError(f"{path}: code before the first '# %%' marker: {line!r}")
    flush()
    for i, (_, text, tags) in enumerate(cells):
        before = cells[i - 1][2] if i else ()
        after = cells[i + 1][2] if i + 1 < len(cells) else ()
        if "exercise" in tags and "solution" not in after:
            raise ValueError(
                f"{path}: the exercise cell {text.splitlines()[0]!r} has no solution cell after it"
            )
        if "solution" in tags and "exercise" not in before:
            raise ValueError(f"{path}: the solution cell {text.splitlines()[0]!r} follows no exercise cell")
    return cells


def has_exercises(path):
    """A lab: a source with exercise cells."""
    return any("exercise" in tags for _, _, tags in read_cells(path))


def make_notebook(path, solutions=False):
    """An nbformat notebook (no outputs) from a percent-format source: the student's version (the
    exercise stubs), or with solutions=True the solved one (each stub replaced by its solution)."""
    drop = "exercise" if solutions else "solution"
    nb = nbformat.v4.new_notebook()
    for kind, text, tags in read_cells(path):
        if drop in tags:
            continue
        cell = nbformat.v4.new_markdown_cell(text) if kind == "markdown" else nbformat.v4.new_code_cell(text)
        if tags:
            cell.metadata["tags"] = list(tags)
        nb.cells.append(cell)
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def execute(nb, timeout=CELL_TIMEOUT):
    """Run every cell in a fresh kernel with notebooks/ as the working directory; raises on a cell error."""
    NotebookClient(
        nb, timeout=timeout, kernel_name=KERNEL, resources={"metadata": {"path": str(HERE)}}
    ).execute()
    return nb


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("only", nargs="*", help="name prefixes of the notebooks to build (default: all)")
    ap.add_argument("--no-execute", action="store_true", help="write the notebooks without running them")
    ap.add_argument(
        "--solutions",
        action="store_true",
        help=f"build the labs solved, into {SOLVED.relative_to(HERE.parent)}/",
    )
    args = ap.parse_args(argv)
    sources = sorted(p for p in SOURCES.glob("*.py") if not args.only or p.stem.startswith(tuple(args.only)))
    if args.solutions:
        sources = [p for p in sources if has_exercises(p)]
    if not sources:
        print(
            f"error: no {'lab ' if args.solutions else ''}source in {SOURCES} matches {args.only}",
            file=sys.stderr,
        )
        return 2
    folder = SOLVED if args.solutions else HERE
    folder.mkdir(exist_ok=True)
    for src in sources:
        nb = make_notebook(src, solutions=args.solutions)
        start = time.time()
        if not args.no_execute:
            execute(nb)
        nbformat.validate(nb)
        out = folder / f"{src.stem}.ipynb"
        nbformat.write(nb, out)
        print(
            f"{out.relative_to(HERE)}: {len(nb.cells)} cells"
            + ("" if args.no_execute else f", ran in {time.time() - start:.0f} s")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
