"""The curation runner: :class:`Step` (a named rule), :class:`Context` (the frame the rules read) and
:func:`apply_steps`, which applies the steps in order so that the first failing rule names a row's drop.

Per-row rules (``Step.expr``) are Polars expressions chained on a LazyFrame; rules that compare rows
(``Step.group``) see only the rows still alive after the rules before them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import CurationConfig

REASON = "_reason"
DETAIL = "_detail"


@dataclass
class Context:
    cfg: CurationConfig
    df: Any  # polars DataFrame, one row per synthetic record
    words: tuple[np.ndarray, np.ndarray] | None = None  # word hashes of df["text"]
    eval_index: Any = None
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Step:
    name: str  # also the rejection reason of the rows this step drops ("" for transforms)
    doc: str
    expr: Callable[[Context], Any] | None = None  # per-row: (condition, detail) Polars expressions
    group: Callable[[Context, np.ndarray], dict[int, str]] | None = None  # rows compared: {row: detail}
    enabled: Callable[[CurationConfig], bool] = lambda cfg: True


def _pl():  # type: ignore[no-untyped-def]
    import polars as pl

    return pl


def apply_steps(ctx: Context, steps: list[Step] | None = None, timings: dict[str, float] | None = None) -> None:
    """Run the steps in order over ``ctx.df``, filling ``_reason``/``_detail`` (first failing rule wins)."""
    pl = _pl()
    if steps is None:
        from .rules import STEPS as steps  # the rules import this module
    df = ctx.df
    if REASON not in df.columns:
        df = df.with_columns(pl.lit(None, dtype=pl.String).alias(REASON), pl.lit(None, dtype=pl.String).alias(DETAIL))
    lf = df.lazy()
    pending = False
    for step in steps:
        if not step.enabled(ctx.cfg):
            continue
        if step.group is not None and step.name.startswith("decontam") and ctx.eval_index is None:
            continue
        t0 = time.perf_counter()
        if step.expr is not None:
            ctx.df = df
            cond, detail = step.expr(ctx)
            hit = pl.col(REASON).is_null() & cond.fill_null(False)
            lf = lf.with_columns(
                pl.when(hit).then(pl.lit(step.name)).otherwise(pl.col(REASON)).alias(REASON),
                pl.when(hit).then(detail.cast(pl.String)).otherwise(pl.col(DETAIL)).alias(DETAIL),
            )
            pending = True
        else:
            if pending:
                df = lf.collect()
                pending = False
            alive = np.flatnonzero(df[REASON].is_null().to_numpy())
            ctx.df = df
            hits = step.group(ctx, alive) if len(alive) else {}  # type: ignore[misc]
            if hits:  # alive rows only, so nothing is overwritten
                rows = pl.Series(np.fromiter(hits.keys(), dtype=np.int64, count=len(hits)))
                df = df.with_columns(
                    df[REASON].scatter(rows, step.name),
                    df[DETAIL].scatter(rows, pl.Series(list(hits.values()), dtype=pl.String)),
                )
            lf = df.lazy()
        if timings is not None:
            timings[step.name] = round(time.perf_counter() - t0, 3)
    ctx.df = lf.collect() if pending else df
