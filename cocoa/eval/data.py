"""Evaluation sets: EvalRecords of one dataset plus the directory their image paths are relative to."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..records import EvalRecord, RecordError
from ..errors import CocoaError


@dataclass
class EvalSet:
    name: str
    meta_task: str
    split: str
    records: list[EvalRecord]
    root: Path | None = None  # image paths in the records are relative to this directory
    source: str = ""  # where it was read from (for messages)
    meta: dict = field(default_factory=dict)
    # Images not stored under ``root`` (MMEB zips): ``read_image(path) -> bytes`` reads one by its
    # relative path at encoding time, ``image_info[path] = (digest, (w, h))`` was computed while loading.
    read_image: Callable[[str], bytes] | None = None
    image_info: dict[str, tuple[str, Any]] = field(default_factory=dict)
    n_skipped: int = 0  # source rows left out (MMEB, only with on_bad_row="skip")


def _check_names(requested: Sequence[str] | None, known: Iterable[str], where: str, what: str = "dataset") -> list[str]:
    known = list(known)
    if not requested:
        return known
    unknown = [n for n in requested if n not in known]
    if unknown:
        raise RecordError(
            f"unknown {what}{'s' if len(unknown) > 1 else ''} {', '.join(repr(u) for u in unknown)} in {where}; "
            f"known: {', '.join(known) if known else '(none)'}"
        )
    seen: list[str] = []
    for n in requested:
        if n not in seen:
            seen.append(n)
    return seen


def _from_records(name: str, records: list[EvalRecord], root: Path | None, source: str) -> EvalSet:
    if not records:
        raise RecordError(f"{source}: dataset {name!r} has no records; regenerate it or leave it out (--datasets)")
    tasks = {r.meta_task for r in records}
    splits = {r.split for r in records}
    if len(tasks) > 1 or len(splits) > 1:
        raise RecordError(
            f"{source}: dataset {name!r} mixes meta-tasks {sorted(tasks)} / splits {sorted(splits)}; "
            "one dataset must have one meta-task and one split"
        )
    return EvalSet(name=name, meta_task=records[0].meta_task, split=records[0].split, records=records, root=root,
                   source=source)


def scenes_eval_dir(path: str | Path) -> Path:
    """The directory holding ``<dataset>/`` EvalRecord datasets: ``path/eval`` or ``path`` itself."""
    from ..shards import is_dataset

    p = Path(path)
    if not p.exists():
        raise RecordError(f"{p} does not exist; build the benchmark first (`cocoa-data scenes --out {p}`)")
    if (p / "eval").is_dir():
        return p / "eval"
    if is_dataset(p) or any(is_dataset(c) for c in p.iterdir() if c.is_dir()):
        return p
    raise RecordError(
        f"{p} holds no evaluation datasets (expected {p}/eval/<dataset>/manifest.json); "
        "pass the scenes root written by `cocoa-data scenes` or its eval/ directory"
    )


def list_scenes(path: str | Path) -> list[str]:
    from ..shards import is_dataset

    d = scenes_eval_dir(path)
    if is_dataset(d):
        return [d.name]
    return sorted(c.name for c in d.iterdir() if c.is_dir() and not c.name.startswith(".") and is_dataset(c))


def load_scenes(path: str | Path, datasets: Sequence[str] | None = None, limit: int | None = None) -> list[EvalSet]:
    """EvalRecord datasets under a scenes root (``root/eval/<dataset>/``) or its ``eval/`` dir."""
    from ..shards import is_dataset, open_dataset

    d = scenes_eval_dir(path)
    single = is_dataset(d)
    names = _check_names(datasets, list_scenes(path), str(d))
    sets = []
    for name in names:
        ddir = d if single else d / name
        ds = open_dataset(ddir)
        if ds.record_type != "EvalRecord":
            raise RecordError(f"{ddir} holds {ds.record_type} records, not EvalRecord; point at an evaluation dataset")
        recs: list[EvalRecord] = []
        for r in ds:
            recs.append(r)  # type: ignore[arg-type]
            if limit is not None and len(recs) >= limit:
                break
        sets.append(_from_records(name, recs, ddir, str(ddir)))
    return sets


def load_mmeb(mmeb_dir: str | Path, datasets: Sequence[str] | None = None, limit: int | None = None, *,
              image_dir: str | Path | None = None, on_bad_row: str = "raise") -> list[EvalSet]:
    """MMEB-eval datasets from a local copy of ``TIGER-Lab/MMEB-eval`` (one parquet config per dataset,
    images in ``images.zip`` or an extracted folder), read by :func:`cocoa.sources.mmeb.iter_mmeb_eval`.

    Images are validated and hashed while loading but not kept in memory: only the ones that still need
    encoding are read again (from the zip) when their batch comes. A row with an unusable image or an
    empty positive stops the run (``on_bad_row="raise"``, the default: dropping rows changes the
    protocol) or, with ``"skip"``, is left out and counted per dataset (``n_skipped``, shown in reports).
    """
    import warnings

    from ..sources.mmeb import ImageSource, SourceReport, image_bytes_checked, iter_mmeb_eval
    from ..sources.mmeb.report import _Skip
    from ..model.collate import CollateError, check_image_size, special_token_in
    from ..records import ImageRef, digest
    from ..model.embedder import image_header_size

    root = Path(mmeb_dir)
    if not root.is_dir():
        raise RecordError(f"--mmeb-dir {root} is not a directory; give a local copy of TIGER-Lab/MMEB-eval "
                          "(<Dataset>/test-*.parquet + images.zip)")
    if on_bad_row not in ("raise", "skip"):
        raise RecordError(f"on_bad_row must be raise or skip, not {on_bad_row!r}")
    _check_images_present(root, datasets, image_dir)
    info: dict[str, tuple[str, Any]] = {}

    def store(dataset: str, ref: ImageRef) -> ImageRef:
        data = ref.bytes or b""
        size = image_header_size(data)
        try:  # an image the model's processor cannot take is a bad row (skipped under on_bad_row="skip")
            check_image_size(size, f"image {ref.path}")
        except CollateError as e:
            raise _Skip("image_aspect_ratio", str(e)) from None
        info[ref.path or ""] = (digest(data), size)
        return ImageRef(path=ref.path)  # drop the bytes: re-read only if this input must be encoded

    report = SourceReport()
    by_name: dict[str, list[EvalRecord]] = {}
    try:
        for rec in iter_mmeb_eval(root, datasets=list(datasets) if datasets else None, max_per_dataset=limit,
                                  image_dir=image_dir, on_error=on_bad_row, report=report, store=store):  # type: ignore[arg-type]
            bad = next(((c, t) for c, t in (("qry_text", rec.qry_text), *(("tgt_text", t) for t in rec.tgt_texts))
                        if special_token_in(t)), None)
            if bad is not None:  # the same rule as the collator's, applied here so that it is a per-row skip
                tok = special_token_in(bad[1])
                where = f"{root}/{rec.dataset}/{rec.meta.get('file', '?')} row {rec.meta.get('row', '?')}"
                msg = (f"{where}: {bad[0]} contains the special token {tok!r}, which the model would read as markup, "
                       "not text")
                if on_bad_row == "raise":
                    raise RecordError(f"{msg}. Fix the row, or pass --on-bad-row skip to leave such rows out (they are "
                                      "counted and shown in the reports)")
                report.kept[rec.dataset] -= 1
                report.skipped["special_token"] += 1
                continue
            by_name.setdefault(rec.dataset, []).append(rec)
    except CocoaError as e:
        msg = str(e).replace("--image-dir", "--mmeb-image-dir")  # the reader's flag is cocoa-eval's --mmeb-image-dir
        if on_bad_row == "raise" and " row " in msg:
            raise RecordError(f"{msg}. Fix the row, or pass --on-bad-row skip to leave such rows out (they are counted "
                              "and shown in the reports)") from None
        if msg != str(e):
            raise RecordError(msg) from None
        raise
    names = list(datasets) if datasets else list(dict.fromkeys(list(report.read) + list(by_name)))

    idir = Path(image_dir) if image_dir is not None else None
    zips = [z for z in (root / "images.zip",) if z.is_file()]
    dirs = [d for d in (idir, root / "eval_images", root) if d is not None and d.is_dir()]
    images = ImageSource(zips=zips, dirs=dirs)

    def read_image(path: str) -> bytes:
        try:
            return image_bytes_checked(images.read(path), path)[0]
        except CocoaError:
            raise
        except Exception as e:  # the reader's skip signal: the image vanished or changed since loading
            raise RecordError(f"MMEB image {path!r} cannot be read any more from {images.describe()} "
                              f"({getattr(e, 'detail', e)}); was the MMEB directory modified during evaluation?") from None

    sets = []
    for name in names:
        skipped = report.read[name] - report.kept[name]
        if skipped:
            warnings.warn(f"MMEB {name}: {skipped} of {report.read[name]} rows skipped as unusable "
                          f"({dict(report.skipped)}); its P@1 is over the {report.kept[name]} remaining rows",
                          stacklevel=2)
        recs = by_name.get(name, [])
        es = _from_records(name, recs, root, f"{root}/{name}")
        es.read_image = read_image
        es.image_info = info
        es.n_skipped = skipped
        es.meta["image_source"] = images
        sets.append(es)
    return sets


def _check_images_present(root: Path, datasets: Sequence[str] | None, image_dir: str | Path | None) -> None:
    """Without ``images.zip``, ``--mmeb-image-dir`` or ``eval_images/``, MMEB images can only be extracted
    beside the parquet files. If the first image paths of a dataset are not there either, the zip is
    missing: say so before anything is read or encoded (not "row 0: image ... is not in ..." -- and
    ``--on-bad-row skip`` would drop every row). Cheap: the first rows of one parquet file per dataset."""
    if image_dir is not None or (root / "images.zip").exists() or (root / "eval_images").is_dir():
        return
    from ..sources.mmeb import ImageSource

    names = list(datasets) if datasets else sorted(
        d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and any(d.glob("**/*.parquet")))
    images = ImageSource(dirs=[root])
    for name in names:
        paths = _first_image_paths(root / name)
        if not paths:
            continue
        found = False
        for p in paths:
            try:
                images.read(p)
            except Exception as e:  # the reader's skip signal, with its reason
                if getattr(e, "reason", "") == "missing_image":
                    continue
            found = True  # there, or unusable for another reason the reader reports per row
            break
        if not found:
            raise RecordError(
                f"--mmeb-dir {root}: images.zip is missing (looked for {root / 'images.zip'}; no --mmeb-image-dir and "
                f"no {root / 'eval_images'}/ either), and the images are not extracted beside the parquet files "
                f"(e.g. {name}'s {paths[0]!r} is not under {root}/). Download images.zip of TIGER-Lab/MMEB-eval into "
                f"{root}/, or pass --mmeb-image-dir DIR with the extracted images")


def _first_image_paths(ddir: Path, rows: int = 8) -> list[str]:
    """Up to a few non-empty image paths from the first rows of a dataset's first parquet file ([] when unreadable:
    the reader then reports the file itself)."""
    try:
        import pyarrow.parquet as pq

        files = sorted(ddir.glob("**/*.parquet"))
        if not files:
            return []
        pf = pq.ParquetFile(files[0])
        cols = [c for c in ("qry_img_path", "tgt_img_path") if c in pf.schema_arrow.names]
        if not cols:
            return []
        batch = next(pf.iter_batches(batch_size=rows, columns=cols), None)
        if batch is None:
            return []
        out: list[str] = []
        for row in batch.to_pylist():
            for c in cols:
                v = row.get(c)
                for x in (v if isinstance(v, list) else [v]):
                    if isinstance(x, bytes):
                        x = x.decode("utf-8", "strict")
                    if isinstance(x, str) and x.strip() and x not in out:
                        out.append(x)
        return out[:16]
    except Exception:  # unreadable, non-UTF-8, odd schema: the full reader names the problem precisely
        return []
