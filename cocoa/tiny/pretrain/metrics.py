"""Reading a pre-trained model's per-step logs (pre-training and vision alignment)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...metrics import read_jsonl
from .config import METRICS_FILE


def read_metrics(model_dir: str | Path, name: str = METRICS_FILE) -> list[dict[str, Any]]:
    """Rows of a saved model's per-step log (``METRICS_FILE``, or ``ALIGN_METRICS_FILE``)."""
    return read_jsonl(Path(model_dir) / name)


def loss_curve(model_dir: str | Path, every: int = 25) -> list[tuple[int, float]]:
    """(step, mean loss over the preceding ``every`` steps) from the saved metrics."""
    rows = read_metrics(model_dir)
    out = []
    for i in range(every, len(rows) + 1, every):
        chunk = rows[i - every:i]
        out.append((chunk[-1]["step"], sum(r["loss"] for r in chunk) / len(chunk)))
    return out
