"""MMEB-eval rows as :class:`~cocoa.records.EvalRecord` (:func:`iter_mmeb_eval`), with meta-task and
IND/OOD split from the MMEB-V1 table; a row with any unusable image is skipped whole and counted."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from ...records import MAX_IMAGE_PIXELS, EvalRecord, ImageRef, _pydantic_msg
from .images import ImageSource
from .layout import EVAL_COLUMNS, EVAL_LAYOUT, EVAL_REPO, MMEBDataset, MMEBError, mmeb_v1_by_name
from .report import SourceReport, _Skip
from .rows import (
    _hub_image_source,
    _hub_rows,
    _is_local,
    _iter_parquet_rows,
    _local_configs,
    _opt_str,
    _require_online,
    _split_files,
    _unknown,
    kept_rows,
)

ImageStore = Callable[[str, ImageRef], ImageRef]


def iter_mmeb_eval(
    source: str | Path = EVAL_REPO,
    *,
    datasets: list[str] | None = None,
    max_per_dataset: int | None = None,
    image_dir: str | Path | None = None,
    on_error: Literal["skip", "raise"] = "skip",
    report: SourceReport | None = None,
    store: ImageStore | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Iterator[EvalRecord]:
    """MMEB-eval rows as :class:`EvalRecord` (candidate 0 is the positive, as in MMEB), with
    ``meta_task``/``split`` from the MMEB-V1 table. ``store(dataset, ref) -> ref`` decides how
    images are kept (default: embedded bytes; :func:`write_mmeb_eval` writes content-addressed
    files). A row with any unusable image is skipped whole (a missing candidate would change the
    protocol) and recorded in ``report``."""
    report = report if report is not None else SourceReport()
    table = mmeb_v1_by_name()
    local = _is_local(source)
    root = Path(source)
    idir = Path(image_dir) if image_dir is not None else None
    if idir is not None and not idir.is_dir():
        raise MMEBError(f"--image-dir {idir} is not a directory; point it at the extracted MMEB-eval images")
    if local:
        configs = _local_configs(root)
        if not configs:
            raise MMEBError(f"{root} holds no parquet files; expected the MMEB-eval layout: {EVAL_LAYOUT}")
        known = sorted(c for c in configs if c in table) or sorted(configs)
    else:
        if not isinstance(source, str) or source.count("/") != 1:
            raise MMEBError(f"{source} does not exist; give a local MMEB-eval directory ({EVAL_LAYOUT}) or a hub repo id")
        _require_online(str(source), EVAL_LAYOUT)
        known = list(table)
    wanted = datasets or known
    bad = [d for d in wanted if d not in known]
    if bad:
        raise _unknown("MMEB-eval dataset(s)", bad, known, str(source))
    unlisted = [d for d in wanted if d not in table]
    if unlisted:
        raise MMEBError(f"{', '.join(unlisted)} not among the 36 MMEB-V1 datasets, so its meta-task and IND/OOD "
                        f"split are unknown; known: {', '.join(table)}")
    if local:
        zips = [z for z in (root / "images.zip",) if z.is_file()]
        dirs = [d for d in (idir, root / "eval_images", root) if d is not None and d.is_dir()]
        images = ImageSource(zips=zips, dirs=dirs, max_pixels=max_pixels)
    else:
        images = _hub_image_source(str(source), "images.zip", idir)
    keep = store or (lambda ds, ref: ref)
    try:
        for name in wanted:
            info = table[name]
            if local:
                sel = _split_files(configs[name], root / name, "test")
                if not sel:
                    raise MMEBError(f"{root / name} has no 'test' split parquet; expected the MMEB-eval layout: {EVAL_LAYOUT}")
                rows: Iterator[tuple[Any, int, dict[str, Any]]] = _iter_parquet_rows(sel, EVAL_COLUMNS, EVAL_LAYOUT)
            else:
                rows = _hub_rows(str(source), name, "test", EVAL_LAYOUT)
            cache: dict[str, ImageRef] = {}
            yield from kept_rows(
                rows, name, source=source, local=local, columns=EVAL_COLUMNS, layout=EVAL_LAYOUT,
                limit=max_per_dataset, report=report, on_error=on_error,
                describe=lambda fname, i: (f"{name}:{fname}:{i}", {"dataset": EVAL_REPO, "file": fname, "row": i}),
                build=lambda row, meta: _eval_record(row, info, images, cache, keep, meta, report),
                where=lambda fname: f"{source} {name}/{fname}", skip_meta={"subset": name})
    finally:
        images.close()


def _eval_record(row: dict[str, Any], info: MMEBDataset, images: ImageSource, cache: dict[str, ImageRef],
                 keep: ImageStore, meta: dict[str, Any], report: SourceReport) -> EvalRecord:
    def img(path: Any, column: str) -> ImageRef | None:
        p = _opt_str(path, column)
        if not p:
            return None
        if p not in cache:
            ref, conv = images.image(p)
            report.converted += conv
            cache[p] = keep(info.name, ref)
        return cache[p]

    texts = row["tgt_text"]
    paths = row["tgt_img_path"]
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(paths, str):
        paths = [paths]
    for column, v in (("tgt_text", texts), ("tgt_img_path", paths)):
        if v is not None and not isinstance(v, list):
            raise _Skip("wrong_type", f"column {column!r} holds a {type(v).__name__} value ({str(v)[:80]!r}), "
                                      "not a list of strings; fix the file")
    texts = [_opt_str(t, "tgt_text") for t in texts or []]
    paths = list(paths or [])
    if len(paths) != len(texts):
        raise _Skip("invalid_row", f"tgt_text has {len(texts)} entries but tgt_img_path has {len(paths)}")
    qry_text = _opt_str(row["qry_text"], "qry_text")
    qry_path = _opt_str(row["qry_img_path"], "qry_img_path")
    qry_image = img(qry_path, "qry_img_path")
    tgt_images = [img(p, "tgt_img_path") for p in paths]
    try:
        return EvalRecord(dataset=info.name, meta_task=info.meta_task, split=info.split, qry_text=qry_text,
                          qry_image=qry_image, tgt_texts=texts, tgt_images=tgt_images,
                          meta={**meta, "qry_img_path": qry_path})
    except Exception as e:
        raise _Skip("invalid_row", f"not a usable evaluation row ({_pydantic_msg(e)})") from None
