"""Build the course notebooks from their sources in notebooks/src/, and run them so outputs are stored.

    python notebooks/build.py                 # all notebooks: build, execute, write notebooks/NN_*.ipynb
    python notebooks/build.py 03 04           # only the notebooks whose name starts with 03 or 04
    python notebooks/build.py --no-execute    # write them without outputs

Why sources: a notebook's JSON is hard to review and to diff, so each notebook is written as a plain
Python file in the "percent" format (as jupytext reads it): a line `# %%` starts a code cell,
`# %% [markdown]` a markdown cell whose lines are comments. This script turns them into .ipynb with
nbformat and executes them with nbclient in the project's Python (the kernel named python3 of the
environment this script runs in), with notebooks/ as the working directory.
"""

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "src"
KERNEL = "python3"
CELL_TIMEOUT = 600  # seconds per cell; each whole notebook is meant to run in well under 3 minutes


def read_cells(path):
    """Cells of a percent-format source: a list of (kind, text) with kind "code" or "markdown"."""
    cells, kind, lines = [], None, []

    def flush():
        text = "\n".join(lines).strip("\n")
        if kind is not None and text.strip():
            cells.append((kind, text))

    for line in Path(path).read_text().splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind == "markdown":
            if line and not line.startswith("#"):
                raise ValueError(f"{path}: markdown line without '#': {line!r}")
            lines.append(line[2:] if line.startswith("# ") else line[1:])
        elif kind == "code":
            lines.append(line)
        elif line.strip() and not line.startswith("#"):
            raise ValueError(f"{path}: code before the first '# %%' marker: {line!r}")
    flush()
    return cells


def make_notebook(path):
    """An nbformat notebook (no outputs) from a percent-format source."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell(text) if kind == "markdown" else nbformat.v4.new_code_cell(text)
        for kind, text in read_cells(path)
    ]
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
    args = ap.parse_args(argv)
    sources = sorted(p for p in SOURCES.glob("*.py") if not args.only or p.stem.startswith(tuple(args.only)))
    if not sources:
        print(f"error: no source in {SOURCES} matches {args.only}", file=sys.stderr)
        return 2
    for src in sources:
        nb = make_notebook(src)
        start = time.time()
        if not args.no_execute:
            execute(nb)
        nbformat.validate(nb)
        out = HERE / f"{src.stem}.ipynb"
        nbformat.write(nb, out)
        print(
            f"{out.name}: {len(nb.cells)} cells"
            + ("" if args.no_execute else f", ran in {time.time() - start:.0f} s")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
