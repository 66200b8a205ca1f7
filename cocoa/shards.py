"""Sharded Arrow datasets: atomic, checksummed, streaming, and readable by Hugging Face ``datasets``.

Format (one dataset = one directory)::

    DIR/manifest.json          schema version, record type, rows, per-shard sha256, provenance
    DIR/shard-00000.arrow      Arrow IPC *file* format (Feather v2), schema metadata carries the
    DIR/shard-00001.arrow      HF features (images as datasets.Image) and cocoa's record type
    DIR/images/...             optional content-addressed image files referenced by relative path

Why Arrow IPC files: ``datasets.load_dataset("arrow", data_files=...)`` reads them (images decode to
PIL through the ``Image`` feature stored in the schema metadata), pyarrow memory-maps them for
random access without loading, and Polars scans them lazily (``pl.scan_ipc``). Shards are always
written through pyarrow (Polars-written files would lose the HF metadata).

Atomicity: a shard is written to a hidden temporary name, fsynced, then renamed; the manifest is
rewritten (also tmp + rename) after every committed shard and lists only complete shards. A manifest
with ``complete: false`` belongs to an interrupted writer: readers refuse it unless asked
(``allow_incomplete=True``, used by resuming writers), and an appending writer cleans up leftovers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from .fs import TextFileError, contained, read_json
from .records import RECORD_TYPES, SCHEMA_VERSION, from_row, schema_for, to_row
from .errors import CocoaError

MANIFEST = "manifest.json"
FORMAT = "cocoa-shards"
# the names cocoa gives its shard files (a dataset's own, an overwrite's, and a synth part's):
# a writer deletes only files that match this *and* are listed in its own validated manifest
SHARD_NAME = re.compile(r"^(?:parts/part-\d{5}-of-\d{5}/)?shard(?:-\d{10})?-\d{5}\.arrow$")


class ShardError(CocoaError):
    """A dataset directory or shard cannot be used as it is; the message says which and what to do."""


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str
    num_rows: StrictInt  # strict: a manifest's "3", 3.0, NaN or true is an edit, not a count
    bytes: StrictInt
    sha256: str


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: str = FORMAT
    schema_version: StrictInt = SCHEMA_VERSION  # strict: "1" or "yes" in a manifest is refused, not coerced
    record_type: str
    num_rows: StrictInt = 0
    complete: StrictBool = False
    shards: list[ShardInfo] = Field(default_factory=list)
    provenance: dict[str, Any] = Field(default_factory=dict)
    created: float = Field(default_factory=time.time)
    updated: float = Field(default_factory=time.time)


# ---------------------------------------------------------------------------------------------
# small atomic-file helpers (used across the project)
# ---------------------------------------------------------------------------------------------
def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; durability is best effort there
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # pid + a random part, created exclusively: threads of one process (or same-pid processes in two
    # containers sharing a disk) never write into each other's temporary file
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}{os.urandom(8).hex()}"
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# manifest
# ---------------------------------------------------------------------------------------------
def is_dataset(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    mf = path / MANIFEST
    if not path.exists():
        raise ShardError(f"{path} does not exist; create it first (e.g. `cocoa-data scenes` or `cocoa-data synth`)")
    if mf.is_dir():
        raise ShardError(f"{mf} is a directory, not a file; the dataset is damaged: regenerate it")
    if not mf.is_file():
        raise ShardError(
            f"{path} is not a cocoa dataset: it has no {MANIFEST}. Point at a directory written by cocoa "
            "(e.g. shards/original, shards/curated) or regenerate it"
        )
    try:
        data = read_json(mf, fix="the dataset is damaged: regenerate it")
    except TextFileError as e:
        raise ShardError(str(e)) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ShardError(f"{mf} is not a cocoa manifest (format != {FORMAT!r}); regenerate the dataset")
    try:
        m = Manifest.model_validate(data)
    except ValidationError as e:
        from .config import format_validation_error

        raise ShardError(f"{mf} is malformed ({format_validation_error(e)}); regenerate the dataset") from None
    if m.schema_version > SCHEMA_VERSION:
        raise ShardError(f"{path} uses schema version {m.schema_version}; this cocoa reads <= {SCHEMA_VERSION}: upgrade cocoa")
    if m.record_type not in RECORD_TYPES:
        raise ShardError(f"{mf}: unknown record type {m.record_type!r}")
    seen: set[str] = set()
    for sh in m.shards:
        contained(path, sh.file, where=str(mf), file=True)  # relative, no '..', no symlink escape, not a dir
        if sh.file in seen:
            raise ShardError(f"{mf} lists {sh.file} twice; the manifest was edited: regenerate the dataset")
        seen.add(sh.file)
        if sh.num_rows < 0 or sh.bytes < 0:
            raise ShardError(f"{mf}: negative row or byte count for {sh.file}; regenerate the dataset")
    total = sum(sh.num_rows for sh in m.shards)
    if total != m.num_rows:
        raise ShardError(
            f"{mf} says num_rows {m.num_rows} but its shards hold {total}; the manifest was edited or damaged: "
            "regenerate the dataset"
        )
    return m


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
class ShardWriter:
    """Streaming, atomic shard writer.

    ``mode``: ``"create"`` (refuse an existing dataset), ``"overwrite"`` (replace it atomically at
    close: the new shards are written beside, the old ones removed only after the new manifest is
    in place), or ``"append"`` (continue an existing, possibly interrupted dataset: resumable jobs).
    Records are validated models or plain dicts already matching the schema (``write_row``).
    """

    def __init__(
        self,
        path: str | Path,
        record_type: str,
        *,
        mode: str = "create",
        max_rows: int = 10_000,
        max_bytes: int = 256 << 20,
        provenance: dict[str, Any] | None = None,
        before_commit: Any = None,
    ) -> None:
        if record_type not in RECORD_TYPES:
            raise ShardError(f"unknown record type {record_type!r}; known: {', '.join(RECORD_TYPES)}")
        if mode not in ("create", "overwrite", "append"):
            raise ValueError(f"mode must be create, overwrite or append, not {mode!r}")
        self.path = Path(path)
        self.record_type = record_type
        self.schema = schema_for(record_type)
        self.max_rows = max(1, int(max_rows))
        self.max_bytes = max(1, int(max_bytes))
        self._rows: list[dict[str, Any]] = []
        self._bytes = 0
        self._closed = False
        self._old_files: list[Path] = []
        self._before_commit = before_commit  # e.g. ImageStore.sync: what a shard refers to is durable first
        self.path.mkdir(parents=True, exist_ok=True)
        existing = (self.path / MANIFEST).is_file()
        if existing and mode == "create":
            raise ShardError(f"{self.path} already holds a dataset; pass overwrite (--overwrite) or choose another directory")
        self._prefix = "shard"
        if existing and mode == "append":
            self.manifest = read_manifest(self.path)
            if self.manifest.record_type != record_type:
                raise ShardError(
                    f"{self.path} holds {self.manifest.record_type} records, not {record_type}; use another directory"
                )
            self.manifest.complete = False
            if provenance:
                self.manifest.provenance.update(provenance)
        else:
            if existing:  # overwrite: keep old shards until the new manifest is in place
                # only files cocoa named and its (validated, contained) manifest lists are ever deleted
                self._old_files = [self.path / s.file for s in read_manifest(self.path).shards
                                   if SHARD_NAME.match(s.file)]
                self._prefix = f"shard-{int(time.time() * 1000) % 10**10:010d}"
            self.manifest = Manifest(record_type=record_type, provenance=provenance or {})
        self._cleanup_leftovers(existing)
        self._next_index = len(self.manifest.shards)
        self._write_manifest()

    # -- housekeeping ----------------------------------------------------------------------------
    def _cleanup_leftovers(self, existing: bool) -> None:
        """Remove what an interrupted writer of *this* dataset left: its temp files, and shards it renamed
        but never recorded. Only names cocoa gives its own files, and only in a directory that already held
        a cocoa manifest (a fresh directory's files are never cocoa's leftovers)."""
        if not existing:
            return
        listed = {s.file for s in self.manifest.shards} | {p.name for p in self._old_files}
        for p in self.path.iterdir():
            if not p.is_file() or p.is_symlink():
                continue
            if re.match(r"^\.(?:shard(?:-\d{10})?-\d{5}\.arrow|manifest\.json)\.tmp-\d+[0-9a-f]*$", p.name):
                p.unlink(missing_ok=True)  # a temp file of an interrupted writer: never complete
            elif SHARD_NAME.match(p.name) and p.name not in listed:
                p.unlink(missing_ok=True)  # renamed but never recorded in the manifest: redo it

    def _write_manifest(self) -> None:
        self.manifest.updated = time.time()
        atomic_write_json(self.path / MANIFEST, self.manifest.model_dump())

    # -- writing ---------------------------------------------------------------------------------
    def write(self, record: BaseModel) -> None:
        self.write_row(to_row(record))

    def write_many(self, records: Iterable[BaseModel]) -> None:
        for r in records:
            self.write(r)

    def write_row(self, row: dict[str, Any]) -> None:
        if self._closed:
            raise ShardError("this writer is closed")
        self._rows.append(row)
        self._bytes += _approx_size(row)
        if len(self._rows) >= self.max_rows or self._bytes >= self.max_bytes:
            self.flush()

    def write_table(self, table: pa.Table) -> None:
        """Write an Arrow table whose columns match the record schema (fast path, no validation)."""
        table = table.select(self.schema.names).cast(self.schema)
        for start in range(0, table.num_rows, self.max_rows):
            self._commit(table.slice(start, self.max_rows))

    def flush(self) -> None:
        """Commit buffered rows as one complete shard (a durable point for resumable jobs)."""
        if not self._rows:
            return
        try:
            table = pa.Table.from_pylist(self._rows, schema=self.schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise ShardError(f"{self.path}: rows do not match the {self.record_type} schema ({e})") from None
        self._rows, self._bytes = [], 0
        self._commit(table)

    def _commit(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if self._before_commit is not None:
            self._before_commit()
        name = f"{self._prefix}-{self._next_index:05d}.arrow"
        self._next_index += 1
        final = self.path / name
        tmp = self.path / f".{name}.tmp-{os.getpid()}"
        with pa.OSFile(str(tmp), "wb") as sink:
            with ipc.new_file(sink, table.schema.with_metadata(self.schema.metadata)) as w:
                w.write_table(table, max_chunksize=1024)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
        size = tmp.stat().st_size
        os.replace(tmp, final)
        fsync_dir(self.path)
        self.manifest.shards.append(ShardInfo(file=name, num_rows=table.num_rows, bytes=size, sha256=digest))
        self.manifest.num_rows += table.num_rows
        self._write_manifest()

    def close(self, provenance: dict[str, Any] | None = None) -> Manifest:
        if self._closed:
            return self.manifest
        self.flush()
        if provenance:
            self.manifest.provenance.update(provenance)
        self.manifest.complete = True
        self._write_manifest()
        for p in self._old_files:
            p.unlink(missing_ok=True)
        self._closed = True
        return self.manifest

    def abort(self) -> None:
        """Leave the dataset marked incomplete (readers refuse it); buffered rows are discarded."""
        self._rows = []
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _approx_size(row: dict[str, Any]) -> int:
    n = 0
    for v in row.values():
        if isinstance(v, (bytes, str)):
            n += len(v)
        elif isinstance(v, dict):
            n += _approx_size(v)
        elif isinstance(v, list):
            n += sum(_approx_size(x) if isinstance(x, dict) else len(x) if isinstance(x, (str, bytes)) else 8 for x in v)
        else:
            n += 8
    return n


def write_records(
    path: str | Path,
    record_type: str,
    records: Iterable[BaseModel],
    *,
    overwrite: bool = False,
    provenance: dict[str, Any] | None = None,
    max_rows: int = 10_000,
    max_bytes: int = 256 << 20,
) -> Manifest:
    """Write records to a new dataset directory (atomically per shard) and return its manifest."""
    with ShardWriter(
        path, record_type, mode="overwrite" if overwrite else "create", max_rows=max_rows, max_bytes=max_bytes,
        provenance=provenance,
    ) as w:
        w.write_many(records)
    return w.manifest


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def check_shard(f: Path, info: ShardInfo, record_type: str, *, verify: bool = True) -> None:
    """What every reader checks before it uses a shard, cheapest first.

    Always: the file exists, its size is the manifest's, it opens as an Arrow IPC file, its columns and
    types are the record type's, its row count is the manifest's, and its text is valid UTF-8 (a
    tampered or foreign shard is refused here, not half-way through a job; Polars would panic on
    invalid UTF-8 and Python would raise a bare UnicodeDecodeError). With ``verify``: its sha256 too
    (it reads every byte; ``docs/reliability.md`` has the measured cost).
    """
    if not f.is_file():
        raise ShardError(f"{f} is listed in the manifest but missing; regenerate the dataset")
    if f.stat().st_size != info.bytes:
        raise ShardError(
            f"{f} has {f.stat().st_size} bytes but the manifest says {info.bytes}: it is truncated or was "
            "modified; regenerate the dataset"
        )
    if verify and sha256_file(f) != info.sha256:
        raise ShardError(f"{f} fails its sha256 checksum (corrupted or modified); regenerate the dataset")
    try:
        reader = ipc.open_file(pa.memory_map(str(f), "r"))
    except (pa.ArrowInvalid, OSError) as e:
        raise ShardError(f"{f} is not a readable Arrow shard ({e}); regenerate the dataset") from None
    want = schema_for(record_type)
    got = reader.schema
    if got.names != want.names or any(not got.field(n).type.equals(want.field(n).type) for n in want.names):
        raise ShardError(
            f"{f} does not have the {record_type} columns/types (has {', '.join(got.names) or 'none'}); "
            "it is not this dataset's shard: regenerate the dataset"
        )
    rows = 0
    text_cols = [i for i, fld in enumerate(got) if _has_text(fld.type)]
    for i in range(reader.num_record_batches):
        try:
            b = reader.get_batch(i)
            rows += b.num_rows
            if text_cols:
                b.select(text_cols).validate(full=True)
        except (pa.ArrowInvalid, OSError) as e:
            what = "holds text that is not valid UTF-8" if "UTF8" in str(e) else f"record batch {i} is unreadable ({e})"
            raise ShardError(f"{f}: {what}; the shard is damaged or not cocoa's: regenerate the dataset") from None
    if rows != info.num_rows:
        raise ShardError(
            f"{f} holds {rows} rows but the manifest says {info.num_rows}; the manifest or shard was modified: "
            "regenerate the dataset"
        )


def _has_text(t: pa.DataType) -> bool:
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return True
    if pa.types.is_struct(t):
        return any(_has_text(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _has_text(t.value_type)
    return False


class ShardDataset:
    """A verified dataset directory. Iterate record batches or records without loading it whole."""

    def __init__(self, path: str | Path, *, verify: bool = True, allow_incomplete: bool = False,
                 record_type: str | None = None) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if record_type is not None and self.manifest.record_type != record_type:
            raise ShardError(f"{self.path} holds {self.manifest.record_type} records, expected {record_type}")
        if not self.manifest.complete and not allow_incomplete:
            raise ShardError(
                f"{self.path} is incomplete: the job writing it was interrupted. Rerun the command that made it "
                "(cocoa's writers resume), or delete the directory"
            )
        for s in self.manifest.shards:
            check_shard(self.path / s.file, s, self.record_type, verify=verify)

    @property
    def record_type(self) -> str:
        return self.manifest.record_type

    @property
    def files(self) -> list[Path]:
        return [self.path / s.file for s in self.manifest.shards]

    @property
    def schema(self) -> pa.Schema:
        return schema_for(self.record_type)

    def __len__(self) -> int:
        return self.manifest.num_rows

    def _open(self, f: Path) -> ipc.RecordBatchFileReader:
        try:
            return ipc.open_file(pa.memory_map(str(f), "r"))
        except (pa.ArrowInvalid, OSError) as e:
            raise ShardError(f"{f} is not a readable Arrow shard ({e}); regenerate the dataset") from None

    def iter_batches(self, columns: list[str] | None = None) -> Iterator[tuple[Path, int, pa.RecordBatch]]:
        """Yield ``(file, first_row_index_in_file, batch)`` per record batch, memory-mapped."""
        for f in self.files:
            reader = self._open(f)
            off = 0
            for i in range(reader.num_record_batches):
                try:
                    b = reader.get_batch(i)
                except (pa.ArrowInvalid, OSError) as e:
                    raise ShardError(f"{f}: record batch {i} is unreadable ({e}); regenerate the dataset") from None
                yield f, off, (b.select(columns) if columns else b)
                off += b.num_rows

    def iter_rows(self, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
        for _, _, b in self.iter_batches(columns):
            yield from b.to_pylist()

    def __iter__(self) -> Iterator[Any]:
        for f, off, b in self.iter_batches():
            for j, row in enumerate(b.to_pylist()):
                yield from_row(self.record_type, row, where=f"{f} row {off + j}")

    def table(self, columns: list[str] | None = None) -> pa.Table:
        """Concatenate all shards (memory-mapped; cheap unless you convert it)."""
        tables = [self._open(f).read_all() for f in self.files]
        if not tables:
            return self.schema.empty_table().select(columns) if columns else self.schema.empty_table()
        t = pa.concat_tables(tables)
        return t.select(columns) if columns else t

    def scan(self):  # type: ignore[no-untyped-def]
        """A Polars LazyFrame over the shards."""
        import polars as pl

        if not self.files:
            return pl.from_arrow(self.schema.empty_table()).lazy()
        return pl.scan_ipc([str(f) for f in self.files])

    def to_hf(self, **kw: Any):  # type: ignore[no-untyped-def]
        """The dataset through Hugging Face ``datasets`` (images decode to PIL, from any working directory).

        ``datasets.Image`` opens a path-only image relative to the current directory; images referred to by
        path (the workspace's image store, an eval set's ``images/``) are therefore given as absolute paths
        here (resolved and contained exactly as :meth:`ImageRef.resolve` does)."""
        import datasets

        ds = datasets.load_dataset("arrow", data_files=[str(f) for f in self.files], split="train", **kw)
        cols = [n for n in self.schema.names if self._path_only(n)]
        if not cols:
            return ds
        from .records import IMAGE_TYPE, ImageRef

        root = self.path.resolve()
        raw, img = datasets.Image(decode=False), datasets.Image()
        is_list = {n: not self.schema.field(n).type.equals(IMAGE_TYPE) for n in cols}
        for n in cols:
            ds = ds.cast_column(n, datasets.List(raw) if is_list[n] else raw)

        def absolute(im: dict[str, Any] | None) -> dict[str, Any] | None:
            if im is None or im.get("bytes") is not None or not im.get("path"):
                return im
            return {"bytes": None, "path": str(ImageRef(path=im["path"]).resolve(root))}

        ds = ds.map(lambda r: {n: [absolute(x) for x in r[n]] if is_list[n] else absolute(r[n]) for n in cols},
                    desc=None)
        for n in cols:
            ds = ds.cast_column(n, datasets.List(img) if is_list[n] else img)
        return ds

    def _path_only(self, column: str) -> bool:
        """Whether some image of ``column`` is referred to by path only (no embedded bytes)."""
        import pyarrow.compute as pc

        from .records import IMAGE_TYPE

        t = self.schema.field(column).type
        if not (t.equals(IMAGE_TYPE) or (pa.types.is_list(t) and t.value_type.equals(IMAGE_TYPE))):
            return False
        for f in self.files:
            col = self._open(f).read_all().column(column)
            if pa.types.is_list(t):
                col = pc.list_flatten(col)
            if len(col) and pc.any(pc.and_(pc.is_null(pc.struct_field(col, "bytes")),
                                           pc.is_valid(pc.struct_field(col, "path")))).as_py():
                return True
        return False


def open_dataset(path: str | Path, **kw: Any) -> ShardDataset:
    return ShardDataset(path, **kw)


def read_records(path: str | Path, **kw: Any) -> Iterator[Any]:
    yield from ShardDataset(path, **kw)


# ---------------------------------------------------------------------------------------------
# the workspace's image store
# ---------------------------------------------------------------------------------------------
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
          (b"BM", "bmp"), (b"II*\x00", "tif"), (b"MM\x00*", "tif"))


def image_extension(data: bytes) -> str:
    """The file extension for encoded image bytes, from their magic number (``img`` when unknown)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    return "img"


class ImageStore:
    """The workspace's content-addressed image store, ``ROOT/images/<xx>/<sha256>.<ext>``: each image is
    stored once per workspace, and the datasets directly under the workspace (``original/``, ``synthetic/``,
    ``curated/``, ``mix/``) refer to it as ``ImageRef(path="../images/<xx>/<sha256>.<ext>")``.

    A file is written to a unique temporary name, fsynced and renamed, so its final name always holds the
    whole image (a killed writer leaves at most a ``.tmp-`` file, removed by :meth:`clean`); it is written
    before any shard that refers to it is committed. ``images/`` carries cocoa's ownership marker. Nothing
    ever deletes a store file (another dataset of the workspace may refer to it): ``--overwrite`` of a
    dataset leaves its images in place.
    """

    DIR = "images"

    def __init__(self, root: str | Path) -> None:
        from .fs import mark_owned

        self.root = Path(root)
        self.dir = self.root / self.DIR
        if self.dir.is_symlink() or (self.dir.exists() and not self.dir.is_dir()):
            raise ShardError(f"{self.dir} is not a directory cocoa made (a link or a file); the workspace's image "
                             "store must be a plain directory: move it away and rerun the command")
        mark_owned(self.dir, "images")
        self._last: tuple[int, bytes, Any] | None = None
        self._known: set[str] = set()
        self._unsynced: list[Path] = []
        self.written = 0
        self.bytes_written = 0

    def put(self, data: bytes) -> Any:
        """Store ``data`` (if not there yet) and return its ``ImageRef`` as seen from a dataset directory."""
        from .records import ImageRef

        last = self._last
        if last is not None and last[0] == id(data) and last[1] is data:
            return last[2]  # the rows of one request share one bytes object
        h = hashlib.sha256(data).hexdigest()
        rel = f"{h[:2]}/{h}.{image_extension(data)}"
        if rel not in self._known:
            f = self.dir / rel
            if not f.is_file() or f.stat().st_size != len(data):
                self._write(f, data)
                self.written += 1
                self.bytes_written += len(data)
            self._known.add(rel)
        ref = ImageRef(path=f"../{self.DIR}/{rel}")
        self._last = (id(data), data, ref)
        return ref

    def _write(self, f: Path, data: bytes) -> None:
        """Temporary name then rename (the final name always holds the whole image); made durable by :meth:`sync`
        before any shard referring to it is committed (one filesystem sync per commit, not one fsync per image:
        an fsync per image tripled the time of `cocoa-data scenes --train 2000` on a loaded disk)."""
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.parent / f".{f.name}.tmp-{os.getpid()}{os.urandom(8).hex()}"
        try:
            with open(tmp, "xb") as fh:
                fh.write(data)
            os.replace(tmp, f)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._unsynced.append(f)

    def sync(self) -> None:
        """Make every image written since the last call durable (``syncfs`` of the store's filesystem on Linux,
        else an fsync per file and directory). Writers call it before committing a shard that refers to them."""
        if not self._unsynced:
            return
        if not _syncfs(self.dir):
            for f in self._unsynced:
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            for d in {f.parent for f in self._unsynced}:
                fsync_dir(d)
            fsync_dir(self.dir)
        self._unsynced = []

    def store_record(self, record: Any) -> Any:
        """``record`` with every embedded image (an ``ImageRef`` field, or a list of them) moved to the store; its
        id is kept (a content id, whatever the storage)."""
        from .records import ImageRef

        upd: dict[str, Any] = {}
        for name in type(record).model_fields:
            v = getattr(record, name)
            if isinstance(v, ImageRef) and v.bytes is not None:
                upd[name] = self.put(v.bytes)
            elif isinstance(v, list) and any(isinstance(x, ImageRef) and x.bytes is not None for x in v):
                upd[name] = [self.put(x.bytes) if isinstance(x, ImageRef) and x.bytes is not None else x for x in v]
        return record.model_copy(update=upd) if upd else record

    def adopt(self, ref: Any, root: str | Path | None) -> Any:
        """``ref`` as a reference into this store: embedded bytes are stored, a store reference is kept (when it
        is this store's), any other path is read under ``root`` and stored."""
        if ref is None:
            return None
        if ref.bytes is None and ref.stored and root is not None and Path(root).resolve().parent == self.root.resolve():
            return ref
        return self.put(ref.read_bytes(root))

    def clean(self) -> None:
        """Remove temporary files an interrupted writer left (only names cocoa's atomic writer gives)."""
        if not self.dir.is_dir():
            return
        for d in self.dir.iterdir():
            if d.is_dir() and not d.is_symlink() and re.fullmatch(r"[0-9a-f]{2}", d.name):
                for f in d.iterdir():
                    if re.fullmatch(r"\.[0-9a-f]{64}\.[a-z]+\.tmp-[0-9a-f]+", f.name) and not f.is_symlink():
                        f.unlink(missing_ok=True)


def _syncfs(directory: Path) -> bool:
    """``syncfs(2)`` of the filesystem holding ``directory``; False where it is not available."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return False
    fd = os.open(directory, os.O_RDONLY)
    try:
        return fn(fd) == 0
    finally:
        os.close(fd)


def store_bytes(root: str | Path) -> tuple[int, int]:
    """(files, bytes) held by the workspace's image store under ``root``."""
    d = Path(root) / ImageStore.DIR
    n = b = 0
    if d.is_dir():
        for f in d.glob("*/*"):
            if f.is_file() and not f.name.startswith("."):
                n += 1
                b += f.stat().st_size
    return n, b


# ---------------------------------------------------------------------------------------------
# workspace convention
# ---------------------------------------------------------------------------------------------
class Workspace:
    """The pipeline's directories under one root (default ``./shards``)::

        images/              the image store: each image once (``ImageStore``), referred to by the datasets below
        original/            PairRecord   source pairs (MMEB-train or scenes)
        synthetic/           SynthRecord  teacher captions and QA
        synthetic/quarantine QuarantineRecord  teacher output that failed validation (raw text + reason)
        curated/             SynthRecord  synthetic rows that passed curation
        curated/rejected     QuarantineRecord  rows curation dropped, with the rule
        mix/                 MixRecord    original + curated at a ratio, with provenance
        eval/                EvalRecord   evaluation sets (scenes), when materialised here
    """

    def __init__(self, root: str | Path = "shards") -> None:
        self.root = Path(root)

    original = property(lambda self: self.root / "original")
    synthetic = property(lambda self: self.root / "synthetic")
    quarantine = property(lambda self: self.root / "synthetic" / "quarantine")
    curated = property(lambda self: self.root / "curated")
    rejected = property(lambda self: self.root / "curated" / "rejected")
    mix = property(lambda self: self.root / "mix")
    eval = property(lambda self: self.root / "eval")
    images = property(lambda self: self.root / ImageStore.DIR)
