"""Where the project keeps and finds files: its cache folder, the shared benchmark data, JSONL.

This module imports nothing of the project, so every other module may import it (the import
graph is a chain: see tests/test_imports.py).
"""

import json
import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent
_BAD_BYTES = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of a byte that is not UTF-8


def cache_dir() -> Path:
    """The project's cache folder (converted default model, fitted grids): $KVOFFLOAD_CACHE, else
    ~/.cache/kvoffload."""
    return Path(os.environ.get("KVOFFLOAD_CACHE") or Path.home() / ".cache" / "kvoffload")


def check_cache_dir() -> Path:
    """cache_dir(), created if missing; else a one-line ValueError that says which folder was tried,
    where its path came from (KVOFFLOAD_CACHE, or HOME) and to set KVOFFLOAD_CACHE. The programs that
    may write the cache (evaluate.py, model.py, convert_gguf.py) call it at their start, so a cache
    that cannot be a folder stops them before any work, not with a traceback deep inside."""
    env = os.environ.get("KVOFFLOAD_CACHE")
    fix = "set KVOFFLOAD_CACHE to a writable folder"
    if env:
        subject = f"KVOFFLOAD_CACHE={env}"
    else:
        try:
            home = Path.home()
        except RuntimeError:  # no HOME and no password entry
            raise ValueError(
                f"no cache folder: KVOFFLOAD_CACHE is not set and HOME is unknown: {fix}"
            ) from None
        subject = f"the cache folder {cache_dir()} (~/.cache/kvoffload with HOME={home}; KVOFFLOAD_CACHE is not set)"
    path = cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        pass  # a file, or a file among its parents: said below
    except OSError as e:
        raise ValueError(f"{subject} cannot be created ({e.strerror}): {fix}") from None
    if not path.is_dir():
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        where = "is a file, not a folder" if blocker == path else f"is inside the file {blocker}"
        raise ValueError(f"{subject} {where}: {fix}")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{subject} is not writable: {fix}")
    return path


def data_dir() -> Path:
    """The real benchmark data (NeedleBench, LongProc, reference grids): $KVOFFLOAD_DATA, else the
    `shared/data` folder beside this repository (it may not exist: callers say so and skip)."""
    return Path(os.environ.get("KVOFFLOAD_DATA") or REPO.parent / "shared" / "data")


def read_jsonl(path, check=None, numbered=False) -> list:
    """The objects of a JSONL file, one per non-empty line; numbered=True: (line number, object) pairs.

    A malformed line raises ValueError naming the file and line, and so does a line for which
    check(obj) returns a complaint (a string); a file that is not UTF-8 text (a binary file given by
    mistake) raises ValueError naming the file and the line of the first bad byte, and one that cannot
    be read one naming the file. A byte-order mark
    at the start (some Windows editors write one) is skipped. Bytes that are not UTF-8 are found line by
    line, so the error names their line (a decoder reading the file in buffers fails at the buffer's
    first line). Every JSONL reader of the project goes through it (Text2JSON, NeedleBench, results
    folders).
    """
    rows = []
    try:  # undecodable bytes become lone surrogates, so each line says whether it has some (_BAD_BYTES)
        f = open(path, encoding="utf-8-sig", errors="surrogateescape")
    except FileNotFoundError:
        raise
    except OSError as e:  # a folder, no permission
        raise ValueError(f"{path}: cannot read it ({e.strerror})") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if _BAD_BYTES.search(line):
                raise ValueError(
                    f"{path}:{lineno}: not UTF-8 text (a binary file?): give a JSONL file, one JSON object "
                    "per line"
                )
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
    return rows
