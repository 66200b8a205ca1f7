"""Readers for MMEB-train and MMEB-eval (TIGER-Lab, VLM2Vec / MMEB-V1), exactly as published.

Layouts read (a local snapshot / git clone of the dataset repo, or the hub when online):

MMEB-train (``TIGER-Lab/MMEB-train``)::

    ROOT/<Subset>/original-00000-of-00001.parquet            one config per subset (underscore names:
    ROOT/<Subset>/diverse_instruction-00000-of-00001.parquet  ImageNet_1K, MSCOCO_t2i, ...); older copies
    ROOT/<Subset>/train-00000-of-00001.parquet                have a single split named ``train``
    ROOT/images_zip/<Subset>.zip                              members images/<Subset>/...

    columns: qry, qry_image_path, pos_text, pos_image_path [, neg_text, neg_image_path]

MMEB-eval (``TIGER-Lab/MMEB-eval``)::

    ROOT/<Dataset>/test-00000-of-00001.parquet               one config per dataset (ImageNet-1K, ...)
    ROOT/images.zip  or  ROOT/eval_images/<Dataset>/...      the images

    columns: qry_text, qry_img_path, tgt_text (list), tgt_img_path (list, "" for text candidates)

Images are read straight from the zips (never extracted) or from an extracted ``image_dir``; a
path is looked up as written and with/without its leading ``images/`` (both unzip conventions
exist in the wild). Texts keep MMEB's Phi-3 placeholder ``<|image_1|>``: the collator swaps it for
the backbone's image tokens. Rows with a bad image (missing member, corrupt file, ``..`` path,
decompression bomb) are skipped *and counted*, each as a :class:`~cocoa.records.QuarantineRecord`
(``stage="source"``) in the :class:`SourceReport` (``on_error="raise"`` stops instead). Structural
problems (missing column, unknown subset, no data) raise :class:`MMEBError` naming the fix.
"""

from __future__ import annotations

import io
import json
import os
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from ...records import (
    MAX_IMAGE_PIXELS,
    EvalRecord,
    ImageRef,
    PairRecord,
    QuarantineRecord,
    _check_relpath,
    _pydantic_msg,
    canonical_json,
    decode_image,
    digest,
)
from ...errors import CocoaError

TRAIN_REPO = "TIGER-Lab/MMEB-train"
EVAL_REPO = "TIGER-Lab/MMEB-eval"
IMAGE_PLACEHOLDER = "<|image_1|>"
TRAIN_COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path")
TRAIN_OPTIONAL = ("neg_text", "neg_image_path")
EVAL_COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
TRAIN_SPLITS = ("original", "diverse_instruction", "train")

TRAIN_LAYOUT = (
    "ROOT/<Subset>/<split>-*.parquet (splits original / diverse_instruction, or train) with columns "
    "qry, qry_image_path, pos_text, pos_image_path [neg_text, neg_image_path], and images in "
    "ROOT/images_zip/<Subset>.zip (members images/<Subset>/...) or an extracted --image-dir; "
    f"e.g. `git clone https://huggingface.co/datasets/{TRAIN_REPO}` on a machine with network, then copy it here"
)
EVAL_LAYOUT = (
    "ROOT/<Dataset>/test-*.parquet with columns qry_text, qry_img_path, tgt_text (list), tgt_img_path (list), "
    "and images in ROOT/images.zip or ROOT/eval_images/ (or --image-dir); "
    f"e.g. `git clone https://huggingface.co/datasets/{EVAL_REPO}` on a machine with network, then copy it here"
)


class MMEBError(CocoaError):
    """An MMEB source cannot be read as given; the message names the file and the expected layout."""


# ---------------------------------------------------------------------------------------------
# the 36 MMEB-V1 evaluation datasets (package data)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MMEBDataset:
    name: str
    meta_task: Literal["classification", "vqa", "retrieval", "grounding"]
    split: Literal["IND", "OOD"]
    train_subset: str | None = None


@lru_cache(maxsize=1)
def mmeb_v1_datasets() -> tuple[MMEBDataset, ...]:
    """The 36 MMEB-V1 eval datasets with meta-task and IND/OOD (from ``mmeb_v1.yaml``)."""
    import yaml

    text = resources.files(__package__).joinpath("mmeb_v1.yaml").read_text()
    return tuple(MMEBDataset(**d) for d in yaml.safe_load(text)["datasets"])


def mmeb_v1_by_name() -> dict[str, MMEBDataset]:
    return {d.name: d for d in mmeb_v1_datasets()}


def mmeb_train_subsets() -> list[str]:
    """The 20 MMEB-train subsets (the IND datasets' training configs)."""
    return [d.train_subset for d in mmeb_v1_datasets() if d.train_subset]


# ---------------------------------------------------------------------------------------------
# reporting skips
# ---------------------------------------------------------------------------------------------
@dataclass
class SourceReport:
    """What a read did: rows read/kept per subset and every skipped row with its reason."""

    read: Counter[str] = field(default_factory=Counter)
    kept: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> count
    quarantine: list[QuarantineRecord] = field(default_factory=list)
    converted: int = 0  # images re-encoded to RGB PNG (CMYK, RGBA, grayscale, palette, other formats)

    def add_skip(self, reason: str, detail: str, key: str, row: dict[str, Any], meta: dict[str, Any]) -> None:
        self.skipped[reason] += 1
        self.quarantine.append(QuarantineRecord(stage="source", reason=reason, detail=detail, key=key,
                                                payload=canonical_json(row), meta=meta))

    def summary(self) -> dict[str, Any]:
        return {"read": dict(self.read), "kept": dict(self.kept), "skipped": dict(self.skipped),
                "rows_read": sum(self.read.values()), "rows_kept": sum(self.kept.values()),
                "rows_skipped": sum(self.skipped.values()), "images_converted_to_rgb": self.converted}


class _Skip(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# ---------------------------------------------------------------------------------------------
# images: zips (read in place) or an extracted directory
# ---------------------------------------------------------------------------------------------
def _candidates(path: str) -> list[str]:
    """Spellings of an MMEB image path to try: as written, without / with a leading ``images/``."""
    out = [path]
    if path.startswith("images/"):
        out.append(path[len("images/"):])
    else:
        out.append("images/" + path)
    return out


def image_bytes_checked(data: bytes, name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[bytes, bool]:
    """Validate image bytes (fully decoded; size guard before decoding) and return ``(bytes, converted)``:
    RGB JPEG/PNG are kept as they are; other modes (CMYK, RGBA, LA, L, P, I;16) or formats are
    converted to RGB and re-encoded as PNG. Raises :class:`_Skip` with the reason."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                mode, fmt = im.mode, im.format
    except Image.DecompressionBombError as e:
        raise _Skip("image_too_large", f"image {name}: {e} (decompression-bomb guard)") from None
    except Exception as e:
        raise _Skip("corrupt_image", f"image {name} cannot be opened ({type(e).__name__}: {e}); it is corrupt or not an image") from None
    if w * h > max_pixels:
        raise _Skip("image_too_large", f"image {name} is {w}x{h} = {w * h} pixels, above the limit of {max_pixels} "
                                       "(decompression-bomb guard); downscale it or raise max_pixels")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            rgb = decode_image(data, name=name, max_pixels=max_pixels)
    except CocoaError as e:
        raise _Skip("corrupt_image", str(e)) from None
    if mode == "RGB" and fmt in ("JPEG", "PNG"):
        return data, False
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue(), True


class ImageSource:
    """Reads MMEB images by their relative path from zips (in place) and/or extracted directories."""

    def __init__(self, zips: list[Path] | None = None, dirs: list[Path] | None = None,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> None:
        self.zips = [Path(z) for z in zips or []]
        self.dirs = [Path(d) for d in dirs or []]
        self.max_pixels = max_pixels
        self._open: dict[Path, tuple[zipfile.ZipFile, set[str]]] = {}

    def _zip(self, z: Path) -> tuple[zipfile.ZipFile, set[str]]:
        if z not in self._open:
            try:
                zf = zipfile.ZipFile(z)
            except zipfile.BadZipFile as e:
                raise MMEBError(f"{z} is not a readable zip ({e}); download it again") from None
            self._open[z] = (zf, set(zf.namelist()))
        return self._open[z]

    def close(self) -> None:
        for zf, _ in self._open.values():
            zf.close()
        self._open.clear()

    def describe(self) -> str:
        parts = [str(z) for z in self.zips] + [f"{d}/" for d in self.dirs]
        return ", ".join(parts) or "(no image zip or directory)"

    def read(self, path: str) -> bytes:
        """Raw bytes of the image at MMEB relative ``path``; raises :class:`_Skip` if unusable."""
        if "\x00" in path:
            raise _Skip("unsafe_path", f"image path {path!r} contains a NUL byte")
        try:
            norm = _check_relpath(path)
        except ValueError as e:
            raise _Skip("unsafe_path", f"{e}; refusing to read it") from None
        if "/../" in f"/{path.replace(chr(92), '/')}/":
            raise _Skip("unsafe_path", f"image path {path!r} contains '..'; refusing to read it")
        names = _candidates(norm)
        for z in self.zips:
            zf, members = self._zip(z)
            for n in names:
                if n in members:
                    info = zf.getinfo(n)
                    if info.file_size > 4 * self.max_pixels + (64 << 20):
                        raise _Skip("image_too_large", f"zip member {z.name}:{n} is {info.file_size} bytes uncompressed")
                    try:
                        return zf.read(n)
                    except (zipfile.BadZipFile, OSError, EOFError) as e:
                        raise _Skip("corrupt_image", f"zip member {z.name}:{n} cannot be read ({e})") from None
        for d in self.dirs:
            for n in names:
                try:
                    f = ImageRef(path=n).resolve(d)
                except (CocoaError, ValueError) as e:
                    raise _Skip("unsafe_path", str(e)) from None
                if f.is_file():
                    return f.read_bytes()
        raise _Skip("missing_image", f"image {path!r} is not in {self.describe()} (tried {', '.join(names)})")

    def image(self, path: str) -> tuple[ImageRef, bool]:
        data, converted = image_bytes_checked(self.read(path), path, self.max_pixels)
        return ImageRef(bytes=data, path=_check_relpath(path)), converted


# ---------------------------------------------------------------------------------------------
# locating data
# ---------------------------------------------------------------------------------------------
def _is_local(source: str | Path) -> bool:
    return Path(source).exists()


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _local_configs(root: Path) -> dict[str, list[Path]]:
    """config name -> its parquet files (any split), for a local snapshot."""
    out: dict[str, list[Path]] = {}
    for p in sorted(root.glob("*/**/*.parquet")):
        cfg = p.relative_to(root).parts[0]
        if cfg.startswith("."):
            continue
        out.setdefault(cfg, []).append(p)
    return out


def _split_files(files: list[Path], cfg_dir: Path, split: str) -> list[Path]:
    sel = [f for f in files if f.name.startswith(f"{split}-") or f.name == f"{split}.parquet"
           or (f.parent != cfg_dir and f.parent.name == split)]
    return sorted(sel)


def _check_columns(schema_names: list[str], required: tuple[str, ...], where: str, layout: str) -> None:
    missing = [c for c in required if c not in schema_names]
    if missing:
        raise MMEBError(
            f"{where} lacks column(s) {', '.join(missing)} (it has {', '.join(schema_names) or 'none'}); "
            f"expected the MMEB layout: {layout}"
        )


def _as_bytes_type(t: Any) -> Any:
    """The Arrow type with every (large_)string replaced by (large_)binary, lists and structs included:
    casting to it never validates UTF-8, so one bad value cannot fail a whole batch."""
    import pyarrow as pa

    if pa.types.is_string(t):
        return pa.binary()
    if pa.types.is_large_string(t):
        return pa.large_binary()
    if getattr(pa.types, "is_string_view", lambda _t: False)(t):
        return pa.binary()
    if pa.types.is_list(t):
        return pa.list_(_as_bytes_type(t.value_type))
    if pa.types.is_large_list(t):
        return pa.large_list(_as_bytes_type(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _as_bytes_type(f.type), f.nullable) for f in t])
    return t


def _decode_text(value: Any, column: str) -> Any:
    """``bytes`` (a string column read as bytes, or a column typed ``binary``) -> ``str``, strictly as UTF-8;
    raises :class:`_Skip` (reason ``invalid_utf8``) naming the column and the offending byte."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        b = bytes(value)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Skip("invalid_utf8", f"column {column!r} is not valid UTF-8 text (byte 0x{b[e.start]:02x} at "
                                        f"offset {e.start}: {b[max(0, e.start - 20):e.start + 20]!r}); "
                                        "re-encode the file as UTF-8") from None
    if isinstance(value, list):
        return [_decode_text(v, column) for v in value]
    if isinstance(value, dict):
        return {k: _decode_text(v, f"{column}.{k}") for k, v in value.items()}
    return value


def decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """A raw row with every text value decoded (see :func:`_decode_text`)."""
    return {k: _decode_text(v, k) for k, v in row.items()}


def _printable(row: dict[str, Any]) -> dict[str, Any]:
    """A raw row made JSON-safe for a quarantine payload (bad bytes shown as ``\\xNN``, never dropped)."""
    def fix(v: Any) -> Any:
        if isinstance(v, (bytes, bytearray, memoryview)):
            return bytes(v).decode("utf-8", "backslashreplace")
        if isinstance(v, list):
            return [fix(x) for x in v]
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        return v

    return {k: fix(v) for k, v in row.items()}


def _iter_parquet_rows(files: list[Path], required: tuple[str, ...], layout: str) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    """Raw rows: text values come as ``bytes`` (decoded per row by :func:`decode_row`, so a row with
    non-UTF-8 text is quarantined with its reason instead of failing the file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:
            raise MMEBError(f"{f} is not a readable parquet file ({type(e).__name__}: {e}); download it again") from None
        _check_columns(pf.schema_arrow.names, required, str(f), layout)
        i = 0
        try:
            for batch in pf.iter_batches(batch_size=1024):
                target = pa.schema([pa.field(x.name, _as_bytes_type(x.type), x.nullable) for x in batch.schema])
                if target != batch.schema:
                    batch = batch.cast(target)
                for row in batch.to_pylist():
                    yield f, i, row
                    i += 1
        except (pa.ArrowException, OSError) as e:
            raise MMEBError(f"{f} cannot be read past row {i} ({type(e).__name__}: {e}); download it again") from None


def _unknown(kind: str, names: list[str], known: list[str], where: str) -> MMEBError:
    return MMEBError(f"unknown {kind} {', '.join(repr(n) for n in names)} in {where}; known: {', '.join(known)}")


# ---------------------------------------------------------------------------------------------
# MMEB-train
# ---------------------------------------------------------------------------------------------
def _require_online(repo: str, layout: str) -> None:
    if _offline():
        raise MMEBError(
            f"{repo} is not a local directory and the hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set); "
            f"provide a local copy laid out as {layout}"
        )


def _hub_rows(repo: str, config: str, split: str, layout: str) -> Iterator[tuple[str, int, dict[str, Any]]]:
    _require_online(repo, layout)
    import datasets

    try:
        ds = datasets.load_dataset(repo, config, split=split)
    except Exception as e:
        raise MMEBError(
            f"cannot load {repo} config {config!r} split {split!r} from the hub ({type(e).__name__}: {e}); "
            f"offline, provide a local copy laid out as {layout}"
        ) from None
    for i, row in enumerate(ds):
        yield f"hf://{repo}/{config}/{split}", i, row


def _hub_image_source(repo: str, filename: str, image_dir: Path | None) -> ImageSource:
    if image_dir is not None:
        return ImageSource(dirs=[image_dir])
    from huggingface_hub import hf_hub_download

    try:
        z = hf_hub_download(repo, filename, repo_type="dataset")
    except Exception as e:
        raise MMEBError(f"cannot download {repo}/{filename} ({type(e).__name__}: {e}); pass --image-dir with the extracted images") from None
    return ImageSource(zips=[Path(z)])


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
        kept = 0
        try:
            for f, i, row in rows:
                if max_per_subset is not None and kept >= max_per_subset:
                    break
                if not local and i == 0:
                    _check_columns(list(row), TRAIN_COLUMNS, f"{source} config {subset}", TRAIN_LAYOUT)
                report.read[subset] += 1
                fname = f.name if isinstance(f, Path) else str(f)
                key = f"{subset}:{used_split}:{fname}:{i}"
                meta = {"dataset": TRAIN_REPO, "subset": subset, "split": used_split, "file": fname, "row": i}
                try:
                    rec = _train_record(decode_row(row), subset, images, meta, report)
                except _Skip as s:
                    if on_error == "raise":
                        raise MMEBError(f"{label} {fname} row {i}: {s.detail}") from None
                    report.add_skip(s.reason, f"{subset}/{fname} row {i}: {s.detail}", key, _printable(row), meta)
                    continue
                report.kept[subset] += 1
                kept += 1
                yield rec
        finally:
            images.close()


def _opt_str(v: Any) -> str:
    if isinstance(v, (bytes, bytearray)):  # never the repr "b'...'": rows are decoded by decode_row first
        return _decode_text(v, "text")
    return "" if v is None else str(v)


def _train_record(row: dict[str, Any], subset: str, images: ImageSource, meta: dict[str, Any],
                  report: SourceReport) -> PairRecord:
    def img(path: Any) -> ImageRef | None:
        p = _opt_str(path)
        if not p:
            return None
        ref, conv = images.image(p)
        report.converted += conv
        return ref

    qry_image, pos_image = img(row["qry_image_path"]), img(row["pos_image_path"])
    neg_text = _opt_str(row.get("neg_text")) or None
    neg_image = img(row.get("neg_image_path"))
    try:
        return PairRecord(source=subset, qry_text=_opt_str(row["qry"]), qry_image=qry_image,
                          pos_text=_opt_str(row["pos_text"]), pos_image=pos_image, neg_text=neg_text,
                          neg_image=neg_image, meta=meta)
    except Exception as e:
        raise _Skip("invalid_row", f"not a usable pair ({_pydantic_msg(e)})") from None


# ---------------------------------------------------------------------------------------------
# MMEB-eval
# ---------------------------------------------------------------------------------------------
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
            kept = 0
            for f, i, row in rows:
                if max_per_dataset is not None and kept >= max_per_dataset:
                    break
                if not local and i == 0:
                    _check_columns(list(row), EVAL_COLUMNS, f"{source} config {name}", EVAL_LAYOUT)
                report.read[name] += 1
                fname = f.name if isinstance(f, Path) else str(f)
                meta = {"dataset": EVAL_REPO, "file": fname, "row": i}
                try:
                    rec = _eval_record(decode_row(row), info, images, cache, keep, meta, report)
                except _Skip as s:
                    if on_error == "raise":
                        raise MMEBError(f"{source} {name}/{fname} row {i}: {s.detail}") from None
                    report.add_skip(s.reason, f"{name}/{fname} row {i}: {s.detail}", f"{name}:{fname}:{i}",
                                    _printable(row), {**meta, "subset": name})
                    continue
                report.kept[name] += 1
                kept += 1
                yield rec
    finally:
        images.close()


def _eval_record(row: dict[str, Any], info: MMEBDataset, images: ImageSource, cache: dict[str, ImageRef],
                 keep: ImageStore, meta: dict[str, Any], report: SourceReport) -> EvalRecord:
    def img(path: Any) -> ImageRef | None:
        p = _opt_str(path)
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
    texts = [_opt_str(t) for t in texts or []]
    paths = list(paths or [])
    if len(paths) != len(texts):
        raise _Skip("invalid_row", f"tgt_text has {len(texts)} entries but tgt_img_path has {len(paths)}")
    qry_image = img(row["qry_img_path"])
    tgt_images = [img(p) for p in paths]
    try:
        return EvalRecord(dataset=info.name, meta_task=info.meta_task, split=info.split, qry_text=_opt_str(row["qry_text"]),
                          qry_image=qry_image, tgt_texts=texts, tgt_images=tgt_images,
                          meta={**meta, "qry_img_path": _opt_str(row["qry_img_path"])})
    except Exception as e:
        raise _Skip("invalid_row", f"not a usable evaluation row ({_pydantic_msg(e)})") from None


# ---------------------------------------------------------------------------------------------
# materialising as cocoa shards
# ---------------------------------------------------------------------------------------------
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
