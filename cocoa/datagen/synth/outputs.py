"""Where a worker's output goes and when it becomes durable: the parts layout, the aggregate manifests
(:func:`merge_parts`), the resume sets, the output rows (synthetic and quarantine) and
:class:`PartWriters`, which commits finished requests in small atomic shards."""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...config import ConfigError
from ...fs import check_removable, is_locked, remove_owned_tree
from ...records import ImageRef, PairRecord, QuarantineRecord, SynthRecord, TemplateInfo, canonical_json
from ...shards import (
    MANIFEST,
    ImageStore,
    Manifest,
    ShardDataset,
    ShardError,
    ShardInfo,
    ShardWriter,
    Workspace,
    atomic_write_json,
    is_dataset,
    read_manifest,
)
from .config import WRITER, SynthConfig
from .planner import Planned
from .source import Source

_HUGE = 1 << 60  # ShardWriter limits: this module decides when to commit (request boundaries)
COMMIT_BYTES = 256 << 20  # ...and commits once this many image bytes wait


# ---------------------------------------------------------------------------------------------
# the parts layout and the aggregate manifests
# ---------------------------------------------------------------------------------------------
def part_name(index: int, num_shards: int) -> str:
    return f"part-{index:05d}-of-{num_shards:05d}"


def _parse_part(name: str) -> tuple[int, int] | None:
    try:
        _, i, _, n = name.split("-")
        return int(i), int(n)
    except ValueError:
        return None


def list_parts(dataset_dir: Path) -> list[Path]:
    d = dataset_dir / "parts"
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and _parse_part(p.name) and is_dataset(p))


@contextlib.contextmanager
def _locked(dataset_dir: Path) -> Iterator[None]:
    dataset_dir.mkdir(parents=True, exist_ok=True)
    with open(dataset_dir / ".merge.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_ours(dataset_dir: Path) -> None:
    """Refuse to take over a dataset directory that another command wrote (it would be lost)."""
    if not is_dataset(dataset_dir):
        return
    m = read_manifest(dataset_dir)
    if m.provenance.get("writer") != WRITER and any(not s.file.startswith("parts/") for s in m.shards):
        raise ShardError(
            f"{dataset_dir} holds a dataset written by another command ({m.record_type}, {m.num_rows} rows); "
            "cocoa-data synth will not mix its output into it: pass --overwrite to replace it, or choose another --out"
        )


def merge_parts(dataset_dir: str | Path, record_type: str, num_shards: int,
                provenance: dict[str, Any] | None = None) -> Manifest:
    """(Re)write ``dataset_dir/manifest.json`` listing the shards of every part (under a file lock).

    ``complete`` is true only when the ``num_shards`` parts of the current split all exist and are
    complete. Parts of an earlier, different split are included (their committed rows are valid and their
    keys were skipped by the current workers) but do not decide completeness.
    """
    dataset_dir = Path(dataset_dir)
    with _locked(dataset_dir):
        _check_ours(dataset_dir)
        expected = {part_name(i, num_shards) for i in range(num_shards)}
        shards: list[ShardInfo] = []
        done: set[str] = set()
        prov: dict[str, Any] = {}
        for p in list_parts(dataset_dir):
            m = read_manifest(p)
            if m.record_type != record_type:
                raise ShardError(f"{p} holds {m.record_type} records, not {record_type}; remove it")
            shards += [ShardInfo(file=f"parts/{p.name}/{s.file}", num_rows=s.num_rows, bytes=s.bytes, sha256=s.sha256)
                       for s in m.shards]
            if m.complete:
                done.add(p.name)
            prov = prov or dict(m.provenance)
        old = read_manifest(dataset_dir) if is_dataset(dataset_dir) else None
        prov.update(provenance or {})
        prov.update({"writer": WRITER, "layout": "parts", "num_shards": num_shards,
                     "parts_complete": sorted(done & expected), "parts_missing": sorted(expected - done)})
        man = Manifest(
            record_type=record_type,
            num_rows=sum(s.num_rows for s in shards),
            complete=expected <= done,
            shards=shards,
            provenance=prov,
        )
        if old is not None:
            man.created = old.created
        atomic_write_json(dataset_dir / MANIFEST, man.model_dump())
        return man


def _load_column(dataset_dir: Path, column: str) -> set[str]:
    out: set[str] = set()
    for p in list_parts(dataset_dir):
        ds = ShardDataset(p, verify=False, allow_incomplete=True)
        out.update(x for x in ds.table([column]).column(column).to_pylist() if x)
    return out


def done_keys(ws: Workspace) -> set[str]:
    """Keys of every finished request (any part): synthesised or quarantined, never asked again."""
    return _load_column(ws.synthetic, "key") | _load_column(ws.quarantine, "key")


def original_ids(ws: Workspace) -> set[str]:
    """Ids of the source pairs already copied into original/ (any part)."""
    return _load_column(ws.original, "id")


def prepare(ws: Workspace, source: Source, config: SynthConfig, own_lock: str) -> None:
    """Before a run writes: ``--overwrite`` (one worker only, none other writing), and every output
    directory is this command's own and holds pairs of this source."""
    cfg = config
    dirs = [ws.synthetic] + ([ws.original] if source.write_original else [])
    if cfg.overwrite:
        if cfg.num_shards > 1:
            raise ConfigError(
                "--overwrite with --num-shards > 1 would let workers delete each other's output; remove "
                f"{ws.synthetic} (and {ws.original}) once before starting the workers")
        busy = [f.name for f in sorted(ws.root.glob(".cocoa-synth-part-*.lock"))
                if f.name != own_lock and is_locked(ws.root, name=f.name)]
        if busy:
            raise ConfigError(f"--overwrite: other `cocoa-data synth` workers are writing {ws.root} "
                              f"({', '.join(b.removeprefix('.cocoa-synth-').removesuffix('.lock') for b in busy)}); "
                              "wait for them to finish or stop them first")
        for d in dirs:  # refuse before deleting any of them
            check_removable(d, flag="--overwrite")
        for d in dirs:
            remove_owned_tree(d, flag="--overwrite")  # only cocoa's own datasets (or empty dirs)
    for d in dirs:
        _check_ours(d)
    if source.write_original and is_dataset(ws.original):
        old = read_manifest(ws.original).provenance.get("source")
        if old and old != source.describe:
            raise ShardError(f"{ws.original} holds pairs of another source ({old}); pass --overwrite "
                             "or choose another --out")


def check_fingerprint(ws: Workspace, fp: dict[str, Any]) -> None:
    """Refuse to add to parts written with other settings (teacher, templates, sampling, ...)."""
    for d in (ws.synthetic, ws.quarantine):
        for p in list_parts(d):
            old = read_manifest(p).provenance.get("fingerprint")
            if old is not None and old != fp:
                diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
                raise ShardError(
                    f"{p} was written with different settings ({', '.join(diff)} differ). Outputs of different "
                    "teachers/templates/sampling would mix: pass --overwrite to start over, or choose another --out"
                )


def merge_all(ws: Workspace, source: Source, num_shards: int, teacher: dict[str, str]) -> None:
    """Rewrite the aggregate manifest of every output directory of the run."""
    n = num_shards
    merge_parts(ws.synthetic, "SynthRecord", n, {"teacher": teacher})
    merge_parts(ws.quarantine, "QuarantineRecord", n, {"teacher": teacher})
    if source.write_original:
        merge_parts(ws.original, "PairRecord", n, {"source": source.describe})


def aggregate_complete(ws: Workspace, source: Source) -> bool:
    dirs = [ws.synthetic, ws.quarantine] + ([ws.original] if source.write_original else [])
    return all(read_manifest(d).complete for d in dirs)


# ---------------------------------------------------------------------------------------------
# the rows a worker writes
# ---------------------------------------------------------------------------------------------
def synth_rows(p: Planned, out: Any, *, teacher: dict[str, str], params_hash: str, seed: int) -> list[SynthRecord]:
    """A request's valid output as SynthRecords: its caption, or one per QA pair."""
    base = dict(parent_id=p.pair.id, source=p.pair.source, image=ImageRef(bytes=p.image), kind=p.task,
                teacher=teacher, template=TemplateInfo(name=p.template.name, hash=p.template.hash),
                params_hash=params_hash, key=p.key)
    meta = {"role": p.role, "image_kind": p.kind, "attempts": p.attempt + 1, "image_digest": p.image_digest,
            "seed": seed}
    ref = p.pair.qry_image if p.role == "query" else p.pair.pos_image
    if ref is not None and ref.path:
        meta["image_path"] = ref.path
    if p.task == "caption":
        return [SynthRecord(caption=out.caption, meta=meta, **base)]
    return [SynthRecord(question=qa.question, answer=qa.answer, meta={**meta, "qa_index": j}, **base)
            for j, qa in enumerate(out.qa)]


def quarantine_row(key: str, pair: PairRecord, reason: str, detail: str, raw: str, meta: dict[str, Any],
                   stage: str = "synth", payload: str = "") -> QuarantineRecord:
    return QuarantineRecord(stage=stage, reason=reason, detail=detail[:4000], record_id=pair.id, key=key,
                            parent_id=pair.id, raw=raw, payload=payload, meta=meta)


def request_quarantine(p: Planned, reason: str, detail: str, raw: str, *, teacher: dict[str, str], params_hash: str,
                       params: dict[str, Any]) -> QuarantineRecord:
    """A request whose output stayed invalid (or was rejected), with every raw answer and the reason."""
    meta = {"role": p.role, "task": p.task, "image_kind": p.kind, "attempts": len(p.raws) or p.attempt + 1,
            "raws": [x[:8000] for x in p.raws], "template": {"name": p.template.name, "hash": p.template.hash},
            "teacher": teacher, "params_hash": params_hash, "image_digest": p.image_digest}
    payload = canonical_json({"task": p.task, "prompt": p.prompt, "image_digest": p.image_digest,
                              "template": p.template.name, "params": params})
    return quarantine_row(p.key, p.pair, reason, detail, raw, meta, payload=payload)


def bad_pair_quarantine(key: str, pair: PairRecord, errors: dict[str, str]) -> QuarantineRecord:
    """A source pair with an image that cannot be read or decoded (kept out of original/)."""
    detail = "; ".join(f"{role} image: {err}" for role, err in errors.items())
    return quarantine_row(key, pair, "image_unreadable", f"pair not copied to original/: {detail}", "",
                          {"roles": sorted(errors)}, stage="source",
                          payload=canonical_json({"id": pair.id, "source": pair.source,
                                                  "qry_text": pair.qry_text, "pos_text": pair.pos_text}))


def source_quarantine(q: QuarantineRecord, key: str) -> QuarantineRecord:
    """A row the source reader set aside, under this run's key for it."""
    return QuarantineRecord(**{**q.model_dump(exclude={"id"}), "key": key, "meta": {**q.meta, "source_key": q.key}})


def embedded_pair(pair: PairRecord, images: dict[str, tuple[bytes | None, str]]) -> PairRecord:
    """The pair with path-referenced images embedded (their paths are relative to another root), from
    the bytes already read (and checked) while planning."""
    upd = {}
    for name, role in (("qry_image", "query"), ("pos_image", "positive"), ("neg_image", "negative")):
        ref = getattr(pair, name)
        if ref is not None and ref.bytes is None:
            upd[name] = ImageRef(bytes=images[role][0])
    return pair.model_copy(update=upd) if upd else pair


def stored_pair(pair: PairRecord, store: ImageStore) -> PairRecord:
    """The pair with its embedded images moved to the workspace's image store (its id is kept: it is the
    pair's content id, whatever the storage)."""
    return store.store_record(pair)


# ---------------------------------------------------------------------------------------------
# this worker's writers and the commit policy
# ---------------------------------------------------------------------------------------------
class PartWriters:
    """This worker's part of synthetic/, quarantine/ and (when the run copies its source) original/,
    appended to; a commit makes every finished request durable (one shard per writer with pending rows),
    so a request's rows always land in the same shard."""

    def __init__(self, ws: Workspace, part: str, provenance: dict[str, Any],
                 original_provenance: dict[str, Any] | None, commit_every: int, commit_seconds: float) -> None:
        self.synthetic = ShardWriter(ws.synthetic / "parts" / part, "SynthRecord", mode="append",
                                     max_rows=_HUGE, max_bytes=_HUGE, provenance=provenance)
        self.quarantine = ShardWriter(ws.quarantine / "parts" / part, "QuarantineRecord", mode="append",
                                      max_rows=_HUGE, max_bytes=_HUGE, provenance=provenance)
        self.original = (ShardWriter(ws.original / "parts" / part, "PairRecord", mode="append",
                                     max_rows=_HUGE, max_bytes=_HUGE, provenance=original_provenance)
                         if original_provenance is not None else None)
        self.store = ImageStore(ws.root)  # each image once per workspace; rows refer to it by digest
        self.store.clean()
        self.commit_every, self.commit_seconds = commit_every, commit_seconds
        self.open = True
        self.pending_rows = 0
        self.pending_orig = 0
        self.pending_bytes = 0
        self.last_commit = time.time()

    def write_rows(self, rows: list[SynthRecord], image_bytes: int) -> None:
        for r in rows:
            if r.image.bytes is not None:  # the image goes to the store (written before the shard is committed)
                r = r.model_copy(update={"image": self.store.put(r.image.bytes)})
            self.synthetic.write(r)
        self.pending_rows += len(rows)
        self.pending_bytes += image_bytes * len(rows)

    def write_quarantine(self, rec: QuarantineRecord) -> None:
        self.quarantine.write(rec)
        self.pending_rows += 1

    def write_original(self, pair: PairRecord) -> None:
        assert self.original is not None
        self.original.write(stored_pair(pair, self.store))
        self.pending_orig += 1

    def maybe_commit(self) -> None:
        """Commit after ``commit_every`` finished rows, 256 MiB of images, or ``commit_seconds``."""
        if (self.pending_rows >= self.commit_every or self.pending_bytes >= COMMIT_BYTES
                or (self.pending_rows and time.time() - self.last_commit >= self.commit_seconds)):
            self.commit()

    def commit(self) -> None:
        """Make every finished request durable (one shard per writer with pending rows)."""
        if not self.open:
            return
        self.store.sync()  # the images the new shards refer to are durable before the shards are committed
        for w in (self.synthetic, self.quarantine, self.original):
            if w is not None:
                w.flush()
        self.pending_rows = self.pending_orig = self.pending_bytes = 0
        self.last_commit = time.time()

    def close(self, complete: bool) -> None:
        """Mark each part complete (``complete``) or leave it incomplete for a rerun; no commit after this."""
        self.open = False
        self.store.sync()
        for w in (self.synthetic, self.quarantine, self.original):
            if w is None:
                continue
            if complete:
                w.close()
            else:
                w.abort()
