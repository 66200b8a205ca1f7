"""The curation report: ``curated/report.json`` (counts per rule with examples, statistics, config, timings)
and its rich table on the console."""

from __future__ import annotations

import json
import time
from typing import Any

from ..shards import Workspace
from .config import CurationConfig
from .rules import STEPS
from .steps import DETAIL, REASON, Context, _pl


def _examples(df, reason: str, k: int) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    pl = _pl()
    sub = df.filter(pl.col(REASON) == reason).head(k)
    return [{"record_id": r["id"], "detail": r[DETAIL], "text": (r["text"] or "")[:160]}
            for r in sub.select("id", DETAIL, "text").iter_rows(named=True)]


def build_report(ws: Workspace, df, ctx: Context, cfg: CurationConfig, eval_data, eval_index,  # type: ignore[no-untyped-def]
                 orig_report: dict[str, Any], in_ck: dict[str, Any], keep_idx, rej_idx, n_images: int,
                 timings: dict[str, float], t_start: float) -> dict[str, Any]:
    """``curated/report.json``: rows in/out, kinds, drops per rule with examples, near-dup and
    decontamination statistics, the config and the timings."""
    pl = _pl()
    counts = df.group_by(REASON).len().filter(pl.col(REASON).is_not_null())
    by_rule = dict(zip(counts[REASON].to_list(), counts["len"].to_list()))
    kinds_in = dict(df.group_by("kind").len().sort("kind").iter_rows())
    kinds_out = dict(df.filter(pl.col(REASON).is_null()).group_by("kind").len().sort("kind").iter_rows())
    drops = {
        s.name: {"count": int(by_rule.get(s.name, 0)), "rule": s.doc,
                 "examples": _examples(df, s.name, cfg.examples) if by_rule.get(s.name) else []}
        for s in STEPS
    }
    report = {
        "input": in_ck,
        "rows_in": df.height,
        "rows_out": int(len(keep_idx)),
        "rows_rejected": int(len(rej_idx)),
        "kinds_in": kinds_in,
        "kinds_out": kinds_out,
        "distinct_images": n_images,
        "drops": drops,
        "near_dup": ctx.stats.get("near", {}),
        "decontamination": {
            "eval_data": None if eval_data is None else str(eval_data),
            "eval_index": eval_index.summary() if eval_index is not None else None,
            "original": orig_report,
        },
        "config": cfg.model_dump(mode="json"),
        "timings_s": timings,
        "total_s": round(time.perf_counter() - t_start, 3),
        "outputs": {"curated": str(ws.curated), "rejected": str(ws.rejected)},
    }
    return report


def print_report(report: dict[str, Any], console: Any = None) -> None:
    """The rich table of rows in/out and drops per rule with an example each."""
    from rich.console import Console
    from rich.table import Table

    con = console or Console()
    t = Table(title=f"curate: {report['rows_in']} rows in, {report['rows_out']} out, "
                    f"{report['rows_rejected']} rejected")
    t.add_column("rule")
    t.add_column("dropped", justify="right")
    t.add_column("example")
    for name, d in report["drops"].items():
        ex = d["examples"][0] if d["examples"] else None
        t.add_row(name, str(d["count"]), "" if ex is None else f"{ex['detail']} | {ex['text'][:60]}")
    orig = report["decontamination"]["original"]
    if orig.get("rejected") is not None:
        t.add_row("original (decontam)", str(orig.get("rejected", 0)), json.dumps(orig.get("by_rule", {})))
    con.print(t)
    if report["decontamination"]["eval_data"] is None:
        con.print("[yellow]no --eval-data given: nothing was decontaminated against evaluation data[/yellow]")
