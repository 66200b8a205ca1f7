"""MMEB-train rows as :class:`~cocoa.records.PairRecord` (:func:`iter_mmeb_train`): arguments checked
when called, bad rows skipped and counted in the :class:`~cocoa.sources.mmeb.report.SourceReport`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from ...records import MAX_IMAGE_PIXELS, ImageRef, PairRecord, _pydantic_msg
from .images import ImageSource
from .layout import TRAIN_COLUMNS, TRAIN_LAYOUT, TRAIN_REPO, TRAIN_SPLITS, MMEBError, mmeb_train_subsets
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


def iter_mmeb_train(
    source: str | Path = TRAIN_REPO,
    *,
    subsets: list[str] | None = None,
    split: str = "original",
    max_per_subset: int | None = None,
    image_dir: str | Path | None = None,
    on_error: Literal["skip", "raise"] = "skip",
    report: SourceReport | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
    source_flag: str = "",
    image_dir_flag: str = "--image-dir",
    split_flag: str = "--split",
) -> Iterator[PairRecord]:
    """MMEB-train rows as :class:`PairRecord` (``source`` = subset; images embedded as bytes, their
    MMEB path kept in ``ImageRef.path``; ``<|image_1|>`` kept in the texts).

    ``source``: a local snapshot directory (see the module doc) or a hub repo id (online only).
    ``split``: ``original`` or ``diverse_instruction``; a snapshot with only ``train`` is read as that.
    Bad rows are skipped and recorded in ``report`` (``on_error="skip"``) or raise.

    The arguments (directories, subsets, split) are checked when this is *called*, before the first
    row is asked for, so a caller can validate its inputs before it creates any output;
    ``source_flag`` / ``image_dir_flag`` / ``split_flag`` are the option names the user typed, for the messages.
    """
    if split not in TRAIN_SPLITS:
        raise MMEBError(f"unknown MMEB-train split {split!r}; known: {', '.join(TRAIN_SPLITS)}")
    report = report if report is not None else SourceReport()
    local = _is_local(source)
    root = Path(source)
    idir = Path(image_dir) if image_dir is not None else None
    if idir is not None and not idir.is_dir():
        raise MMEBError(f"{image_dir_flag} {idir} is not a directory; point it at the extracted MMEB-train images")
    if local:
        if not root.is_dir():
            raise MMEBError(f"{source_flag + ' ' if source_flag else ''}{root} is a file, not a directory; give the "
                            f"MMEB-train directory ({TRAIN_LAYOUT})")
        configs = _local_configs(root)
        if not configs:
            raise MMEBError(f"{source_flag + ' ' if source_flag else ''}{root} holds no parquet files; expected the "
                            f"MMEB-train layout: {TRAIN_LAYOUT}")
        known = sorted(configs)
        wanted = subsets or known
        bad = [s for s in wanted if s not in configs]
        if bad:
            raise _unknown("MMEB-train subset(s)", bad, known, str(root))
        for subset in wanted:  # every subset's split exists: checked now, not when its turn comes
            files = configs[subset]
            if not _split_files(files, root / subset, split) and not (
                    split == "original" and _split_files(files, root / subset, "train")):
                splits = sorted({f.name.split("-")[0].removesuffix(".parquet") for f in files})
                raise MMEBError(f"{root / subset} has no {split!r} split (found: {', '.join(splits)}); "
                                f"choose one of them with {split_flag}")
    else:
        configs = {}
        if not isinstance(source, str) or source.count("/") != 1 or str(source).startswith((".", "/", "~")):
            raise MMEBError(f"{source_flag + ' ' if source_flag else ''}{source} does not exist; give a local "
                            f"MMEB-train directory ({TRAIN_LAYOUT}) or a hub repo id")
        _require_online(str(source), TRAIN_LAYOUT)
        known = mmeb_train_subsets()
        wanted = subsets or known
        bad = [s for s in wanted if s not in known]
        if bad:
            raise _unknown("MMEB-train subset(s)", bad, known, str(source))
    return _train_rows(source, root, local, configs, wanted, split, max_per_subset, idir, on_error, report, max_pixels)


def _train_rows(source: str | Path, root: Path, local: bool, configs: dict[str, list[Path]], wanted: list[str],
                split: str, max_per_subset: int | None, idir: Path | None, on_error: str, report: SourceReport,
                max_pixels: int) -> Iterator[PairRecord]:
    for subset in wanted:
        if local:
            files = configs[subset]
            sel = _split_files(files, root / subset, split)
            used_split = split
            if not sel and split == "original":
                sel, used_split = _split_files(files, root / subset, "train"), "train"
            if not sel:
                splits = sorted({f.name.split("-")[0].removesuffix(".parquet") for f in files})
                raise MMEBError(f"{root / subset} has no {split!r} split (found: {', '.join(splits)}); "
                                f"choose one of them with --split")
            rows: Iterator[tuple[Any, int, dict[str, Any]]] = _iter_parquet_rows(sel, TRAIN_COLUMNS, TRAIN_LAYOUT)
            zips = [z for z in (root / "images_zip" / f"{subset}.zip",) if z.is_file()]
            dirs = [d for d in (idir, root / "images", root) if d is not None and d.is_dir()]
            images = ImageSource(zips=zips, dirs=dirs, max_pixels=max_pixels)
            label = str(root)
        else:
            used_split = split
            rows = _hub_rows(str(source), subset, split, TRAIN_LAYOUT)
            images = _hub_image_source(str(source), f"images_zip/{subset}.zip", idir)
            label = str(source)
        try:
            yield from kept_rows(
                rows, subset, source=source, local=local, columns=TRAIN_COLUMNS, layout=TRAIN_LAYOUT,
                limit=max_per_subset, report=report, on_error=on_error,
                describe=lambda fname, i: (f"{subset}:{used_split}:{fname}:{i}",
                                           {"dataset": TRAIN_REPO, "subset": subset, "split": used_split,
                                            "file": fname, "row": i}),
                build=lambda row, meta: _train_record(row, subset, images, meta, report),
                where=lambda fname: f"{label} {fname}")
        finally:
            images.close()


def _train_record(row: dict[str, Any], subset: str, images: ImageSource, meta: dict[str, Any],
                  report: SourceReport) -> PairRecord:
    def img(column: str) -> ImageRef | None:
        p = _opt_str(row.get(column), column)
        if not p:
            return None
        ref, conv = images.image(p)
        report.converted += conv
        return ref

    qry_text, pos_text = _opt_str(row["qry"], "qry"), _opt_str(row["pos_text"], "pos_text")
    neg_text = _opt_str(row.get("neg_text"), "neg_text") or None
    qry_image, pos_image = img("qry_image_path"), img("pos_image_path")
    neg_image = img("neg_image_path")
    try:
        return PairRecord(source=subset, qry_text=qry_text, qry_image=qry_image,
                          pos_text=pos_text, pos_image=pos_image, neg_text=neg_text,
                          neg_image=neg_image, meta=meta)
    except Exception as e:
        raise _Skip("invalid_row", f"not a usable pair ({_pydantic_msg(e)})") from None
