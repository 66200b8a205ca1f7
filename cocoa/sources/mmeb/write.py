"""MMEB as cocoa shards: MMEB-train as one PairRecord dataset, MMEB-eval as one EvalRecord dataset per
MMEB dataset (content-addressed image files), the skipped rows as QuarantineRecord shards."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...records import ImageRef, digest
from .layout import EVAL_REPO, TRAIN_REPO
from .read_eval import iter_mmeb_eval
from .read_train import iter_mmeb_train
from .report import SourceReport


def _write_quarantine(path: Path, report: SourceReport, overwrite: bool) -> None:
    from ...shards import write_records

    write_records(path, "QuarantineRecord", report.quarantine, overwrite=overwrite)


def write_mmeb_train(
    source: str | Path, out: str | Path, *, overwrite: bool = False, progress: Callable[[int], None] | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """MMEB-train -> PairRecord shards at ``out`` (images embedded) and the skipped rows as
    QuarantineRecord shards at ``out/quarantine``. Returns the report summary (also in the manifest)."""
    from ...shards import ShardWriter

    report = SourceReport()
    out = Path(out)
    prov = {"source": str(source), "dataset": TRAIN_REPO, **{k: v for k, v in kw.items() if k != "report"}}
    with ShardWriter(out, "PairRecord", mode="overwrite" if overwrite else "create", provenance=json.loads(
            json.dumps(prov, default=str))) as w:
        for k, rec in enumerate(iter_mmeb_train(source, report=report, **kw)):
            w.write(rec)
            if progress:
                progress(k + 1)
        w.manifest.provenance["report"] = report.summary()
    _write_quarantine(out / "quarantine", report, overwrite)
    return report.summary()


class _DirImageStore:
    """Content-addressed image files inside an evaluation dataset directory (shared candidates are stored once)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.count = 0

    def __call__(self, dataset: str, ref: ImageRef) -> ImageRef:
        data = ref.bytes or b""
        h = digest(data)
        ext = "jpg" if data[:3] == b"\xff\xd8\xff" else "png"
        rel = f"images/{h[:2]}/{h}.{ext}"
        f = self.root / dataset / rel
        if not f.exists():
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(data)
            self.count += 1
        return ImageRef(path=rel)


def write_mmeb_eval(
    source: str | Path, out_root: str | Path, *, datasets: list[str] | None = None, overwrite: bool = False,
    progress: Callable[[str, int], None] | None = None, **kw: Any,
) -> dict[str, Any]:
    """MMEB-eval -> one EvalRecord dataset per MMEB dataset under ``out_root/<Dataset>/`` (images in
    its content-addressed ``images/`` folder, referenced by relative path, like the scenes eval sets),
    skipped rows in ``out_root/quarantine``. Returns the report summary."""
    from ...shards import ShardWriter

    out_root = Path(out_root)
    report = SourceReport()
    store = _DirImageStore(out_root)
    writers: dict[str, ShardWriter] = {}
    try:
        for rec in iter_mmeb_eval(source, datasets=datasets, report=report, store=store, **kw):
            w = writers.get(rec.dataset)
            if w is None:
                w = writers[rec.dataset] = ShardWriter(
                    out_root / rec.dataset, "EvalRecord", mode="overwrite" if overwrite else "create",
                    max_rows=500, provenance={"source": str(source), "dataset": EVAL_REPO, "config": rec.dataset,
                                              "meta_task": rec.meta_task, "split": rec.split})
            w.write(rec)
            if progress:
                progress(rec.dataset, report.kept[rec.dataset] + 1)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    for w in writers.values():
        w.close()
    _write_quarantine(out_root / "quarantine", report, overwrite)
    return {**report.summary(), "images_written": store.count}
