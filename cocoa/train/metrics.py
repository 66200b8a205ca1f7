"""What a run reports per step, on rank 0: ``OUT/metrics.jsonl`` (through :mod:`cocoa.metrics`, truncated
to the checkpoint on resume), TensorBoard when asked, the stage's ``loss.png`` and the progress bar.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .preflight import TrainError
from ..metrics import append_jsonl, read_jsonl, truncate_jsonl

METRICS = "metrics.jsonl"


class Metrics:
    """JSONL always (``OUT/metrics.jsonl``); TensorBoard when asked. Rank 0 only."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool) -> None:
        self.path = Path(out) / METRICS
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out) / "tensorboard"))
            except ImportError as e:
                raise TrainError(f"--tensorboard needs the tensorboard package ({e}); pip install tensorboard") from None

    def truncate(self, stage: int, step: int) -> None:
        """Drop lines written after checkpoint ``step`` of ``stage`` (a resumed run rewrites them)."""
        if self.enabled:
            truncate_jsonl(self.path, lambda r: r.get("stage", 0) < stage
                           or (r.get("stage") == stage and r.get("step", 0) <= step))

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        append_jsonl(self.path, row)
        if self.tb is not None:
            k = row["stage"]
            for key, v in row.items():
                if isinstance(v, (int, float)) and key not in ("stage", "step"):
                    self.tb.add_scalar(f"stage{k}/{key}", v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(out: str | Path, stage: int | None = None) -> list[dict[str, Any]]:
    """The rows of ``OUT/metrics.jsonl`` (of one stage when ``stage`` is given)."""
    return read_jsonl(Path(out) / METRICS, None if stage is None else (lambda r: r.get("stage") == stage))


def plot_loss(out: Path, stage: int, dest: Path) -> Path | None:
    rows = [r for r in read_metrics(out, stage) if "loss" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2, label="loss")
    for part in sorted({k for r in rows for k in r if k.startswith("loss_")}):
        ax.plot([r["step"] for r in rows if part in r], [r[part] for r in rows if part in r], lw=0.8, label=part)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"CoCoA stage {stage}")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = dest.parent / f".{dest.name}.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, dest)
    return dest


class StepProgress:
    """Progress on rank 0 (step, loss, lr, tokens/s, ETA): a live bar on a terminal, plain periodic lines in
    logs and pipes (:mod:`cocoa.progress`); silent elsewhere."""

    def __init__(self, enabled: bool, stage: int, total: int, start: int) -> None:
        self.enabled = enabled
        self.p = None
        if enabled:
            from rich.console import Console

            from ..progress import bar

            self.p = bar(unit="steps", fields=("{task.fields[info]}",), console=Console(stderr=True), transient=False)
            self.task = self.p.add_task(f"stage {stage}", total=total, completed=start, info="")

    def __enter__(self) -> "StepProgress":
        if self.p is not None:
            self.p.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.p is not None:
            self.p.__exit__(*exc)

    def update(self, done: int, row: dict[str, Any]) -> None:
        if self.p is not None:
            info = (f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  {row['tokens_per_s']:.0f} tok/s  "
                    f"pad {row['padding_share']:.0%}")
            self.p.update(self.task, completed=done, info=info)


__all__ = ["Metrics", "read_metrics", "plot_loss", "StepProgress", "METRICS"]
