"""Per-step metrics as JSON lines: one writer and one reader for every job that logs steps
(training stages, vision alignment, generative pre-training, the ablation).

A line cut by a kill is skipped on reading (it is the last line, and the job that resumes rewrites it);
a resumed job drops the lines written after its checkpoint with :func:`truncate_jsonl`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def append_jsonl(path: str | Path, row: dict[str, Any]) -> None:
    """Append one row (flushed, so a kill loses at most the line being written)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def read_jsonl(path: str | Path, where: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
    """The rows of a metrics file (none if it does not exist); cut or non-JSON lines are skipped."""
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    for line in p.read_bytes().decode("utf-8", "replace").splitlines():
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if isinstance(r, dict) and (where is None or where(r)):
            rows.append(r)
    return rows


def truncate_jsonl(path: str | Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Rewrite ``path`` atomically with only the rows ``keep`` accepts (a resumed job rewrites the rest)."""
    from .shards import atomic_write_text

    p = Path(path)
    if not p.is_file():
        return
    atomic_write_text(p, "".join(json.dumps(r) + "\n" for r in read_jsonl(p, keep)))
