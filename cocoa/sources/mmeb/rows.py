"""Raw MMEB rows: locating a snapshot's configs and splits (or the hub), reading parquet with text as
bytes, and decoding each row's text strictly as UTF-8 (a bad row is skipped, never the file)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .images import ImageSource
from .layout import MMEBError
from .report import SourceReport, _Skip


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


def _opt_str(v: Any, column: str = "text") -> str:
    """A text value: ``str`` as it is, bytes decoded strictly, null -> ``""``; any other type (a struct, a
    number, a list) raises :class:`_Skip` (reason ``wrong_type``) naming the column -- never stringified."""
    if isinstance(v, (bytes, bytearray)):  # never the repr "b'...'": rows are decoded by decode_row first
        return _decode_text(v, column)
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    raise _Skip("wrong_type", f"column {column!r} holds a {type(v).__name__} value ({str(v)[:80]!r}), not text; "
                              "fix the file so the column is a string column")


def kept_rows(rows: Iterator[tuple[Any, int, dict[str, Any]]], config: str, *, source: str | Path, local: bool,
              columns: tuple[str, ...], layout: str, limit: int | None, report: SourceReport, on_error: str,
              describe: Callable[[str, int], tuple[str, dict[str, Any]]],
              build: Callable[[dict[str, Any], dict[str, Any]], Any], where: Callable[[str], str],
              skip_meta: dict[str, Any] | None = None) -> Iterator[Any]:
    """The records of one config's raw ``rows``, at most ``limit`` kept. ``describe(file, i)`` gives a row's
    quarantine key and meta, ``build(decoded_row, meta)`` its record; a row that raises :class:`_Skip` is
    counted in ``report`` with its reason (meta plus ``skip_meta``), or raises :class:`MMEBError` starting
    with ``where(file)`` when ``on_error="raise"``. Hub rows have their columns checked on the first row."""
    kept = 0
    for f, i, row in rows:
        if limit is not None and kept >= limit:
            break
        if not local and i == 0:
            _check_columns(list(row), columns, f"{source} config {config}", layout)
        report.read[config] += 1
        fname = f.name if isinstance(f, Path) else str(f)
        key, meta = describe(fname, i)
        try:
            rec = build(decode_row(row), meta)
        except _Skip as s:
            if on_error == "raise":
                raise MMEBError(f"{where(fname)} row {i}: {s.detail}") from None
            report.add_skip(s.reason, f"{config}/{fname} row {i}: {s.detail}", key, _printable(row),
                            {**meta, **(skip_meta or {})})
            continue
        report.kept[config] += 1
        kept += 1
        yield rec
