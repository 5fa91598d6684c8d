"""Where the project keeps and finds files: its cache folder, the shared benchmark data, JSONL.

This module imports nothing of the project, so every other module may import it (the import
graph is a chain: see tests/test_imports.py).
"""

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parent


def cache_dir() -> Path:
    """The project's cache folder (converted default model, fitted grids): $KVOFFLOAD_CACHE, else
    ~/.cache/kvoffload."""
    return Path(os.environ.get("KVOFFLOAD_CACHE") or Path.home() / ".cache" / "kvoffload")


def data_dir() -> Path:
    """The real benchmark data (NeedleBench, LongProc, reference grids): $KVOFFLOAD_DATA, else the
    `shared/data` folder beside this repository (it may not exist: callers say so and skip)."""
    return Path(os.environ.get("KVOFFLOAD_DATA") or REPO.parent / "shared" / "data")


def read_jsonl(path, check=None, numbered=False) -> list:
    """The objects of a JSONL file, one per non-empty line; numbered=True: (line number, object) pairs.

    A malformed line raises ValueError naming the file and line, and so does a line for which
    check(obj) returns a complaint (a string); a file that is not UTF-8 text (a binary file given by
    mistake) raises ValueError naming the file, and so does one that cannot be read. Every JSONL reader
    of the project goes through it (Text2JSON, NeedleBench, results folders).
    """
    rows, lineno = [], 0
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise
    except OSError as e:  # a folder, no permission
        raise ValueError(f"{path}: cannot read it ({e.strerror})") from None
    with f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                complaint = check(obj) if check else None
                if complaint:
                    raise ValueError(f"{path}:{lineno}: {complaint}")
                rows.append((lineno, obj) if numbered else obj)
        except UnicodeDecodeError:
            raise ValueError(
                f"{path}: not UTF-8 text after line {lineno} (a binary file?): "
                "give a JSONL file, one JSON object per line"
            ) from None
    return rows
