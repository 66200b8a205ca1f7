"""Reports of an :class:`~cocoa.eval.scoring.EvalResult`: rich table, markdown, PNG bar chart.

Every report has the same shape whatever was evaluated: one row per dataset (grouped by meta-task),
then one row per meta-task (classification, VQA, retrieval, grounding), IND, OOD and overall. A row
with nothing behind it shows "-". ``compare`` (another result, e.g. the model before training) adds
a "before" column and the difference.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from .scoring import META_TASKS, SPLITS, EvalResult

META_LABELS = {"classification": "Classification", "vqa": "VQA", "retrieval": "Retrieval", "grounding": "Grounding"}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _delta(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{100 * (a - b):+.1f}"


def _n(r: dict[str, Any]) -> str:
    if r["kind"] != "dataset":
        return f"{r['n']} ds"
    return f"{r['n']} (+{r['skipped']} skipped)" if r.get("skipped") else str(r["n"])


def rows(result: EvalResult, compare: EvalResult | None = None) -> list[dict[str, Any]]:
    """The report's rows: ``kind`` is "dataset" or "summary"; values are fractions or None."""
    out: list[dict[str, Any]] = []
    order = {m: i for i, m in enumerate(META_TASKS)}
    names = sorted(result.datasets, key=lambda n: (order.get(result.datasets[n].meta_task, 99), n))
    for name in names:
        d = result.datasets[name]
        before = compare.datasets[name].p_at_1 if compare is not None and name in compare.datasets else None
        out.append({"kind": "dataset", "name": name, "meta_task": d.meta_task, "split": d.split, "n": d.n,
                    "value": d.p_at_1, "before": before, "skipped": d.n_skipped})
    metas = list(META_TASKS) + [m for m in result.meta_tasks if m not in META_TASKS]
    for m in metas:
        n_ds = sum(1 for d in result.datasets.values() if d.meta_task == m)
        out.append({"kind": "summary", "name": META_LABELS.get(m, m), "meta_task": m, "split": "", "n": n_ds,
                    "value": result.meta_tasks.get(m), "before": compare.meta_tasks.get(m) if compare else None})
    for s in SPLITS:
        n_ds = sum(1 for d in result.datasets.values() if d.split == s)
        out.append({"kind": "summary", "name": s, "meta_task": "", "split": s, "n": n_ds,
                    "value": result.splits.get(s), "before": compare.splits.get(s) if compare else None})
    out.append({"kind": "summary", "name": "Overall", "meta_task": "", "split": "", "n": len(result.datasets),
                "value": result.overall, "before": compare.overall if compare else None})
    return out


def _title(result: EvalResult) -> str:
    label = result.label or Path(result.model).name or result.model
    return f"cocoa-eval · {result.benchmark} · {label} · P@1 (%)"


def rich_table(result: EvalResult, compare: EvalResult | None = None):  # type: ignore[no-untyped-def]
    from rich.table import Table

    caption = None
    if compare is not None:
        caption = f"Before = {compare.label or compare.model}; Δ = P@1 - Before (points)"
    t = Table(title=_title(result), caption=caption, show_lines=False)
    t.add_column("Dataset / average")
    t.add_column("Meta-task")
    t.add_column("Split")
    t.add_column("N", justify="right")
    if compare is not None:
        t.add_column("Before", justify="right")
    t.add_column("P@1", justify="right", style="bold")
    if compare is not None:
        t.add_column("Δ", justify="right")
    rs = rows(result, compare)
    first_summary = True
    for r in rs:
        if r["kind"] == "summary" and first_summary:
            t.add_section()
            first_summary = False
        cells = [r["name"], META_LABELS.get(r["meta_task"], r["meta_task"]), r["split"], _n(r)]
        if compare is not None:
            cells.append(_pct(r["before"]))
        cells.append(_pct(r["value"]))
        if compare is not None:
            cells.append(_delta(r["value"], r["before"]))
        t.add_row(*cells, style="bold" if r["name"] == "Overall" else None)
    return t


def markdown(result: EvalResult, compare: EvalResult | None = None) -> str:
    head = ["Dataset / average", "Meta-task", "Split", "N"]
    if compare is not None:
        head.append("Before")
    head.append("P@1 (%)")
    if compare is not None:
        head.append("Δ")
    lines = [f"# {_title(result)}", "", f"- model: `{result.model}` (hash `{result.model_hash}`)"]
    if compare is not None:
        lines.append(f"- before: `{compare.model}` (hash `{compare.model_hash}`)")
    enc = result.encode
    if enc:
        lines.append(f"- inputs: {enc.get('unique_inputs', '?')} unique, {enc.get('encoded', '?')} encoded, "
                     f"{enc.get('cached', '?')} from the cache")
    lines += ["- P@1: positive strictly above every distractor (ties count against it); averages are unweighted means "
              "over datasets", "", "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for r in rows(result, compare):
        name = f"**{r['name']}**" if r["kind"] == "summary" else r["name"]
        cells = [name, META_LABELS.get(r["meta_task"], r["meta_task"]), r["split"], _n(r)]
        if compare is not None:
            cells.append(_pct(r["before"]))
        cells.append(_pct(r["value"]))
        if compare is not None:
            cells.append(_delta(r["value"], r["before"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: EvalResult, path: str | Path, compare: EvalResult | None = None) -> Path:
    """A PNG bar chart: the averages on top, every dataset below (with ``compare`` side by side)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rs = rows(result, compare)
    summ = [r for r in rs if r["kind"] == "summary"]
    dsets = [r for r in rs if r["kind"] == "dataset"]
    n_ds = max(len(dsets), 1)
    fig = Figure(figsize=(max(8.0, 0.45 * n_ds + 2), 8.5))  # Agg canvas, no pyplot global state
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 1, gridspec_kw={"height_ratios": [1, 1.3]})

    def bars(ax, items, title):  # type: ignore[no-untyped-def]
        x = np.arange(len(items))
        val = [100 * (r["value"] or 0.0) for r in items]
        width = 0.4 if compare is not None else 0.7
        if compare is not None:
            bef = [100 * (r["before"] or 0.0) for r in items]
            ax.bar(x - width / 2, bef, width, label=compare.label or Path(compare.model).name or "before", color="#9aa5b1")
            ax.bar(x + width / 2, val, width, label=result.label or Path(result.model).name or "model", color="#2b6cb0")
            ax.legend(fontsize=8)
        else:
            ax.bar(x, val, width, color="#2b6cb0")
        for xi, r, v in zip(x, items, val):
            txt = "-" if r["value"] is None else f"{v:.1f}"
            ax.text(xi + (width / 2 if compare is not None else 0), v + 1, txt, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x)
        ax.set_xticklabels([r["name"] for r in items], rotation=30 if len(items) > 6 else 0, ha="right" if len(items) > 6 else "center",
                           fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_ylabel("P@1 (%)")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)

    bars(axes[0], summ, _title(result))
    bars(axes[1], dsets, "per dataset")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex}.png"  # unique: never another writer's
    try:
        fig.savefig(tmp, dpi=110, format="png")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_reports(result: EvalResult, out_dir: str | Path, compare: EvalResult | None = None,
                  make_plot: bool = True) -> dict[str, Path]:
    """``results.json``, ``results.md`` and (unless disabled) ``results.png`` in ``out_dir``."""
    from ..shards import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": result.save_json(out / "results.json")}
    atomic_write_text(out / "results.md", markdown(result, compare))
    paths["markdown"] = out / "results.md"
    if make_plot:
        paths["plot"] = plot(result, out / "results.png", compare)
    return paths
