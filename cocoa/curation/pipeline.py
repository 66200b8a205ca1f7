"""`cocoa-data curate`: ``synthetic/`` -> ``curated/`` (+ ``curated/rejected/``, ``curated/report.json``).

The pipeline is a list of small named steps (:data:`STEPS`, :mod:`cocoa.curation.rules`, one module per rule
family) over one Polars frame with a row per synthetic record (:mod:`cocoa.curation.frame`), applied in
order by :func:`cocoa.curation.steps.apply_steps`. Per-row rules are Polars expressions applied lazily;
rules that compare rows (exact and near duplicates, image near-duplicates, decontamination) see only the
rows still alive after the rules before them. The first rule that fails names the row's ``reason``; every dropped row
is written to ``curated/rejected/`` as a ``QuarantineRecord(stage="curate", reason=<rule>)``
(:mod:`cocoa.curation.rejected`); ``curated/report.json`` counts them (:mod:`cocoa.curation.report`).

With ``--eval-data``, original PairRecords (``original/``) are decontaminated too: contaminated
original rows are written to ``curated/rejected/`` (``meta.input = "original"``) and ``mix`` leaves
them out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CocoaError
from ..records import canonical_json
from ..shards import MANIFEST, ShardError, ShardWriter, Workspace, atomic_write_json, open_dataset
from .config import CurationConfig
from .frame import load_frame, pd_isnull, text_features
from .inputs import dataset_checksum, open_checked, pa_indices
from .rejected import quarantine_table, synth_payloads
from .report import build_report, print_report
from .rules import RULES, STEPS
from .rules.contamination import decontaminate_original
from .steps import DETAIL, REASON, Context, Step, _pl, apply_steps


@dataclass
class CurationResult:
    report: dict[str, Any]
    kept: int
    rejected: int


def run_curation(
    data: str | Path = "shards",
    config: CurationConfig | None = None,
    eval_data: str | Path | None = None,
    show_progress: bool = True,
    console: Any = None,
) -> CurationResult:
    """Curate ``DATA/synthetic`` into ``DATA/curated`` (see the module docstring).

    Holds the workspace lock for the whole run; ``curated/`` is rebuilt beside the old one and swapped in
    when complete (:mod:`cocoa.curation.output`).
    """
    from .output import workspace_lock

    ws = Workspace(data)
    with workspace_lock(ws.root, "cocoa-data curate", f"there is no {ws.synthetic} to curate; run `cocoa-data synth "
                        f"--out {ws.root}` first"):
        return _run_curation(ws, config or CurationConfig(), eval_data, show_progress, console)


def quarantine_summary(path: Path, top: int = 5) -> tuple[int, list[tuple[str, int]]] | None:
    """(rows, [(reason, count), ...] most frequent first) of a QuarantineRecord dataset, or None if unreadable."""
    pl = _pl()
    try:
        q = open_dataset(path, record_type="QuarantineRecord", verify=False)
        counts = q.scan().group_by("reason").len().sort(["len", "reason"], descending=[True, False]).collect()
    except (CocoaError, OSError, pl.exceptions.PolarsError):
        return None
    return len(q), [(r, int(n)) for r, n in counts.head(top).iter_rows()]


def _no_rows_message(ws: Workspace) -> str:
    qs = quarantine_summary(ws.quarantine) if (ws.quarantine / MANIFEST).is_file() else None
    if qs and qs[0]:
        n, top = qs
        reasons = ", ".join(f"{r} {c}" for r, c in top)
        return (f"{ws.synthetic} has no rows: every teacher output of the synth run failed validation ({n} rows "
                f"quarantined in {ws.quarantine}; top reasons: {reasons}). See them with `cocoa-data inspect "
                f"{ws.quarantine}`, fix the teacher, model or prompts and rerun `cocoa-data synth`; or train stages "
                "1-2 on original pairs only: `cocoa-data mix --ratio 1:0`")
    return (f"{ws.synthetic} has no rows and nothing was quarantined: the synth run had no input pairs. Check "
            f"{ws.original} and rerun `cocoa-data synth`, or train stages 1-2 on original pairs only: "
            "`cocoa-data mix --ratio 1:0`")


def _run_curation(ws: Workspace, cfg: CurationConfig, eval_data: str | Path | None, show_progress: bool,
                  console: Any) -> CurationResult:
    from .output import check_replaceable, staged_output

    t_start = time.perf_counter()
    ds = open_checked(ws.synthetic, "SynthRecord", "synthetic data",
                      f"run `cocoa-data synth --out {ws.root}` first (it writes {ws.synthetic})")
    if len(ds) == 0:
        raise ShardError(_no_rows_message(ws))
    check_replaceable(ws.curated, "cocoa-data curate")  # refuse a foreign curated/ before any work
    timings: dict[str, float] = {}
    progress = make_progress(console, show_progress)
    with progress:
        t0 = time.perf_counter()
        df, n_images = load_frame(ds, cfg, progress)
        timings["load+images"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        df, words = text_features(df, cfg, progress)
        timings["text_features"] = round(time.perf_counter() - t0, 3)
        eval_index = None
        if eval_data is not None:
            from .decontam import build_eval_index

            t0 = time.perf_counter()
            eval_index = build_eval_index(eval_data, cfg.decontam.ngram, cfg.image.max_pixels,
                                          cfg.decontam.template_texts)
            if not eval_index.usable():
                top = sorted(eval_index.problems.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
                why = (f": {', '.join(f'{r} {n}' for r, n in top)} (e.g. {eval_index.unreadable[0]})"
                       if top else ": no readable eval image and no eval text long enough to compare "
                       f"({cfg.decontam.ngram} words)")
                raise ShardError(f"--eval-data {eval_data} yields nothing to decontaminate against{why}; fix the "
                                 "eval data (`cocoa-data inspect` it) or point --eval-data at another directory")
            timings["eval_index"] = round(time.perf_counter() - t0, 3)
        ctx = Context(cfg=cfg, df=df, words=words, eval_index=eval_index)
        steps_task = progress.add_task("rules", total=len(STEPS))
        step_times: dict[str, float] = {}
        for step in STEPS:  # one step at a time so the bar moves; state lives in ctx.df
            apply_steps(ctx, [step], step_times)
            progress.advance(steps_task)
        timings.update(step_times)
        # what the write and the report read; the word hashes and the per-row features are freed
        df = ctx.df.select("id", "kind", "text", "caption", "question", "answer", REASON, DETAIL)
        ctx.df, ctx.words, words = None, None, None
        orig_rows: list[dict[str, Any]] = []
        orig_report: dict[str, Any] = {"note": "no --eval-data: original rows were not decontaminated"}
        if eval_index is not None:
            t0 = time.perf_counter()
            orig_rows, orig_report = decontaminate_original(ws, cfg, eval_index, cfg.image.max_pixels, progress)
            timings["decontam_original"] = round(time.perf_counter() - t0, 3)

    # --- write curated/ and curated/rejected/ -----------------------------------------------------
    t0 = time.perf_counter()
    reasons = df[REASON].to_numpy()
    keep_idx = np.flatnonzero(pd_isnull(reasons))
    rej_idx = np.flatnonzero(~pd_isnull(reasons))
    in_ck = dataset_checksum(ws.synthetic)
    # the checksums of both inputs: `mix` refuses a curated/ that was not made from the current ones
    orig_ck = dataset_checksum(ws.original) if (ws.original / MANIFEST).is_file() else None
    prov = {"stage": "curate", "input": in_ck, "original": orig_ck, "config": cfg.model_dump(mode="json"),
            "eval_data": None if eval_data is None else str(eval_data)}
    with staged_output(ws.curated, "curated", "cocoa-data curate") as stage:  # swapped in when complete
        _write_outputs(stage, prov, ds, df, reasons, keep_idx, rej_idx, orig_rows, cfg.text.normalize)
        timings["write"] = round(time.perf_counter() - t0, 3)
        report = build_report(ws, df, ctx, cfg, eval_data, eval_index, orig_report, in_ck, keep_idx, rej_idx, n_images,
                         timings, t_start)
        report["warnings"] = [w for w in [eval_index.warning() if eval_index is not None else None] if w]
        atomic_write_json(stage / "report.json", report)
    return CurationResult(report=report, kept=int(len(keep_idx)), rejected=int(len(rej_idx)) + len(orig_rows))


def rows_in_batches(ds, idx: np.ndarray, batch: int):  # type: ignore[no-untyped-def]
    """The rows ``idx`` (ascending row numbers of ``ds``, its shards in order) as Arrow tables of exactly
    ``batch`` rows (the last one shorter), each with its row numbers. One shard is mapped at a time and
    only the wanted rows are copied out of it, so memory holds about two batches, not the dataset."""
    import pyarrow as pa

    pieces: list = []
    held = start = 0
    for f in ds.files:
        t = ds._open(f).read_all()
        n = t.num_rows
        lo, hi = np.searchsorted(idx, [start, start + n])
        if hi > lo:
            pieces.append((t.take(pa_indices(idx[lo:hi] - start)), idx[lo:hi]))
            held += int(hi - lo)
        del t
        start += n
        while held >= batch:
            tab = pa.concat_tables([p for p, _ in pieces])
            rows = np.concatenate([r for _, r in pieces])
            yield tab.slice(0, batch), rows[:batch]
            rest = tab.slice(batch)
            pieces = [(rest, rows[batch:])] if rest.num_rows else []
            held = rest.num_rows
    if held:
        yield pa.concat_tables([p for p, _ in pieces]), np.concatenate([r for _, r in pieces])


def _write_outputs(stage: Path, prov: dict[str, Any], ds, df, reasons, keep_idx, rej_idx,  # type: ignore[no-untyped-def]
                   orig_rows: list[dict[str, Any]], normalize: bool) -> None:
    import pyarrow as pa

    with ShardWriter(stage, "SynthRecord", mode="create", provenance=prov) as w:
        for kept, rows in rows_in_batches(ds, keep_idx, w.max_rows):  # one output shard per batch
            if normalize:
                sub = df.select("caption", "question", "answer")[rows]
                for c in ("caption", "question", "answer"):
                    kept = kept.set_column(kept.schema.get_field_index(c), c, sub[c].to_arrow().cast(pa.string()))
            w.write_table(kept)
    with ShardWriter(stage / "rejected", "QuarantineRecord", mode="create", provenance=prov) as w:
        det = df[DETAIL]
        for tab, part in rows_in_batches(ds, rej_idx, 20_000):
            kinds, sources = tab.column("kind").to_pylist(), tab.column("source").to_pylist()
            w.write_table(quarantine_table(
                [str(reasons[r]) for r in part], [d or "" for d in det.gather(part).to_list()],
                tab.column("id").to_pylist(), tab.column("key").to_pylist(), tab.column("parent_id").to_pylist(),
                synth_payloads(tab),
                [canonical_json({"input": "synthetic", "kind": k, "source": so}) for k, so in zip(kinds, sources)],
            ))
        for row in orig_rows:
            w.write_row(row)


def make_progress(console: Any = None, show: bool = True):  # type: ignore[no-untyped-def]
    """cocoa's standard progress bar (count, rate, ETA; plain periodic lines in logs and pipes)."""
    from ..progress import bar

    return bar(unit="rows", console=console, disable=not show)


__all__ = ["STEPS", "RULES", "Step", "Context", "apply_steps", "run_curation", "print_report", "open_checked",
           "dataset_checksum", "CurationResult", "quarantine_summary", "make_progress"]
