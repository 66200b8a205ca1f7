"""`cocoa-data curate --engine ray`: the same rules as the Polars path, with the per-row work and the
shuffles on Ray Data, and the same ``curated/`` and ``curated/rejected/`` rows.

Design (docs/curation.md "Scaling out"): Ray does what grows with the data, the driver applies the cheap
final decisions with the Polars path's own functions.

1. **Blocks** (``map_batches``, one task per block of at most ``block_rows`` rows of a ``synthetic/`` shard):
   Polars inside each block builds the rows' features with the functions :func:`~cocoa.curation.frame.load_frame`
   and :func:`~cocoa.curation.frame.text_features` use (normalisation, validity, image keys and features
   read from the workspace's image store or the embedded bytes, word hashes, the exact-duplicate digest) and
   applies every per-row rule with :func:`~cocoa.curation.steps.apply_steps` (first failing rule wins, as in
   the Polars path). A row's per-row outcome depends on that row only, so blocks give the same outcome as one
   frame. In the same pass each block computes, for the rows still alive: the decontamination matches against
   the eval index (broadcast once with ``ray.put``; the rules' own functions, whose result for a row depends
   on that row only) and, for the near-duplicate kinds, the word shingles and one key per LSH band (the same
   rensa signatures and band keys :func:`~cocoa.curation.dedup.near_duplicates` computes). The result is
   materialised: it is the barrier before the rules that compare rows.
2. **Rules that compare rows**, one at a time in ``STEPS`` order, each over the rows alive after the rules
   before it (the driver's bitmap of rejected rows, broadcast per step):
   ``exact_dup_image`` and ``exact_dup_global``: one shuffle by the text digest (both keys contain it) into
   partitions; inside a partition each key's lowest row index is kept (the Polars path keeps the earliest row
   in input order), ``exact_dup_global`` over the partition's rows that ``exact_dup_image`` left alive.
   ``near_dup``: rows are exploded to (band, band key) and shuffled by it; each bucket yields its candidate
   pairs with :func:`~cocoa.curation.dedup.bucket_pairs` (all pairs, or a star around the lowest row in
   buckets above ``near.max_bucket_pairs``); the driver verifies the pairs with the exact shingle Jaccard
   (:func:`~cocoa.curation.dedup.pair_jaccard`, shingles fetched for the candidate rows only) and keeps the
   lowest row of each connected component. ``image_near_dup``: on the driver, from the per-row image-key hash
   and pHash the block pass returned (each distinct image's first alive row, then
   :func:`~cocoa.curation.images.phash_clusters`). ``decontam_*``: the per-row matches of step 1, applied
   to the rows still alive.
3. **Output**: the driver writes ``curated/`` and ``curated/rejected/`` from the memory-mapped shards in row
   order, in the Polars path's shard sizes, through the same staged directory (nothing half-written is ever
   in place), with the same provenance and a ``report.json`` built by the same function.

Exact equality with the Polars path rests on every per-row feature being a function of the row alone and on
each shuffle grouping by the Polars path's own key. Two differences are by design and astronomically rare:
the Polars path flags LSH candidates with rensa's band index and then groups the flagged rows by the 64-bit
band key, here rows are grouped by that key directly; and ``image_near_dup`` tells images apart by a 64-bit
hash of their key, the Polars path by the key itself (each ~2^-64 per pair of rows or images).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..shards import MANIFEST, ShardError, Workspace, atomic_write_json
from .config import CurationConfig
from .steps import DETAIL, REASON, Context, _pl

#: group steps whose result for a row depends on that row only: computed in the block pass, applied in order
ROWWISE = ("decontam_image", "decontam_text")
_P = np.uint64(0x9E3779B97F4A7C15)


class RayEngineError(ShardError):
    """Ray is missing or the cluster cannot be reached; the message says what to do."""


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise RayEngineError("--engine ray needs Ray Data: pip install 'cocoa[ray]' (or 'ray[data]>=2.60')") from None
    return ray


def _connect(ray: Any, address: str | None) -> bool:
    """Join ``address`` / ``$RAY_ADDRESS``, or start a local cluster; True when this run started Ray."""
    import logging
    import warnings

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"ray\.data\..*")
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        else:
            ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                     object_store_memory=512 * 2**20, logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"join the Ray cluster at {address}" if address else "start a local Ray cluster"
        raise RayEngineError(f"--engine ray: cannot {where} ({str(e).splitlines()[0][:200]}); start one with "
                             "`ray start --head` and pass --ray-address, or check the address") from None
    return True


def check_steps(steps: list[Any]) -> None:
    """The engine applies every per-row rule in the block pass, before the rules that compare rows: refuse a
    ``STEPS`` order it cannot reproduce, and a row-comparing rule it has no Ray implementation for."""
    seen_group = None
    for s in steps:
        if s.expr is not None and seen_group is not None:
            raise RayEngineError(f"--engine ray applies per-row rules before the rules that compare rows, but STEPS "
                                 f"has {s.name!r} after {seen_group!r}; use --engine polars")
        if s.group is not None:
            if s.name not in _GROUP and s.name not in ROWWISE:
                raise RayEngineError(f"--engine ray has no implementation of rule {s.name!r}; use --engine polars")
            seen_group = s.name


# -------------------------------------------------------------------------------------------------
# 1. the block pass (runs in Ray workers)
# -------------------------------------------------------------------------------------------------
_CACHE: dict[str, Any] = {}


def _cfg(cfg_json: dict[str, Any]) -> CurationConfig:
    import json

    k = "cfg:" + json.dumps(cfg_json, sort_keys=True)
    if k not in _CACHE:
        _CACHE[k] = CurationConfig.model_validate(cfg_json)
    return _CACHE[k]


def _get(box: list[Any] | None, cache: bool = False) -> Any:
    """The object behind a boxed ObjectRef; with ``cache``, kept in this worker process for the next block
    (only the latest such object: a long-lived cluster's workers do not accumulate old runs' eval indexes)."""
    import ray

    if not box:
        return None
    ref = box[0]
    if not cache:
        return ray.get(ref)
    k = "ref:" + ref.hex()
    if k not in _CACHE:
        for old in [x for x in _CACHE if x.startswith("ref:")]:
            del _CACHE[old]
        _CACHE[k] = ray.get(ref)
    return _CACHE[k]


def _list_u64(arrays: list[np.ndarray | None]):  # type: ignore[no-untyped-def]
    import pyarrow as pa

    lens = np.array([0 if a is None else len(a) for a in arrays], dtype=np.int64)
    offs = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum(lens, out=offs[1:])
    vals = [a for a in arrays if a is not None and len(a)]
    flat = np.concatenate(vals).astype(np.uint64) if vals else np.zeros(0, dtype=np.uint64)
    mask = pa.array([a is None for a in arrays], type=pa.bool_())
    return pa.LargeListArray.from_arrays(pa.array(offs), pa.array(flat, type=pa.uint64()), mask=mask)


def block_features(file: str, start: int, stop: int, row0: int, cfg: CurationConfig, root: Path,
                   eval_index: Any, root_text: str | None = None) -> Any:
    """The features, per-row outcome and comparison inputs of rows ``start:stop`` of one shard (Arrow table).

    ``root``: the dataset directory, absolute (a worker's working directory is not the driver's);
    ``root_text``: the same directory as the driver was given it, for the messages that name it."""
    import pyarrow as pa
    from pyarrow import ipc

    from .dedup import _signatures, _subset, band_keys, text_digests
    from .frame import image_keys, pd_isnull, text_features
    from .images import ImageTable
    from .rules import STEPS
    from .rules.validity import record_problems_frame
    from .steps import apply_steps
    from .text import ngrams, normalize_series

    pl = _pl()
    t = ipc.open_file(pa.memory_map(file, "r")).read_all().slice(start, stop - start)
    raw = pl.from_arrow(t)
    cols = ["id", "parent_id", "source", "kind", "caption", "question", "answer", "key"]
    df = raw.select(cols).with_row_index("_row", offset=row0).with_columns(pl.col("_row").cast(pl.Int64))
    df = df.with_columns(record_problems_frame(raw.lazy()), pl.col("kind").fill_null(""), pl.col("id").fill_null(""))
    if cfg.text.normalize:
        df = df.with_columns(normalize_series(df[c]).alias(c) for c in ("caption", "question", "answer"))
    df = df.with_columns(
        text=pl.when(pl.col("kind") == "qa")
        .then(pl.concat_str([pl.col("question").fill_null(""), pl.col("answer").fill_null("")], separator=" "))
        .otherwise(pl.col("caption").fill_null("")),
    )
    images = ImageTable(max_pixels=cfg.image.max_pixels, workers=1)  # Ray runs the blocks in parallel
    keys = image_keys(t.column("image"), images, {}, root)
    df = df.with_columns(pl.Series("_img", keys.tolist(), dtype=pl.String),
                         pl.Series("_imgh", text_digests(keys.tolist())))
    frame = images.frame()
    if root_text is not None and root_text != str(root):  # "... is missing (referenced as ... under ROOT)"
        frame = frame.with_columns(pl.col("img_error").str.replace_all(f"under {root}); ", f"under {root_text}); ",
                                                                      literal=True))
    df = df.join(frame, on="_img", how="left", maintain_order="left")
    df, words = text_features(df, cfg)
    ctx = Context(cfg=cfg, df=df, words=words, eval_index=eval_index)
    apply_steps(ctx, [s for s in STEPS if s.expr is not None])
    df = ctx.df
    n = df.height
    alive = np.flatnonzero(pd_isnull(df[REASON].to_numpy()))
    out: dict[str, Any] = {}
    # rules whose result for a row depends on that row only (decontamination): their per-row details
    for s in STEPS:
        if s.name in ROWWISE:
            det: list[str | None] = [None] * n
            if s.enabled(cfg) and eval_index is not None and len(alive):
                for j, d in s.group(ctx, alive).items():  # type: ignore[misc]
                    det[j] = d
            out["_g_" + s.name] = pa.array(det, type=pa.string())
    # near duplicates: shingles and one key per LSH band (the signatures near_duplicates computes)
    c = cfg.near
    sh_l: list[np.ndarray | None] = [None] * n
    bk_l: list[np.ndarray | None] = [None] * n
    if c.enabled and len(alive):
        kinds = df["kind"].to_numpy()
        sel = alive[np.isin(kinds[alive], list(c.kinds))]
        sh, soff = ngrams(*_subset(*words, sel), c.shingle, short="unigrams")
        ne = np.flatnonzero(np.diff(soff) > 0)
        if len(ne):
            sh, soff = _subset(sh, soff, ne)
            r = c.num_perm // c.bands
            keys_b = np.zeros((len(ne), c.bands), dtype=np.uint64)
            for b in range(c.bands):
                vals = np.asarray(_signatures(sh, soff, r, c.seed * 1_000_003 + b).to_rows(), dtype=np.uint64)
                keys_b[:, b] = band_keys(vals.reshape(len(ne), r))
            for i, j in enumerate(sel[ne]):
                sh_l[j] = sh[soff[i]:soff[i + 1]]
                bk_l[j] = keys_b[i]
    base = df.select("_row", "id", "parent_id", "kind", "text", "_img", "_imgh", "img_phash", "_tdig", REASON,
                     DETAIL).to_arrow()
    for k, v in out.items():
        base = base.append_column(k, v)
    base = base.append_column("_sh", _list_u64(sh_l)).append_column("_bands", _list_u64(bk_l))
    base = base.append_column("_hasb", pa.array([x is not None for x in bk_l], type=pa.bool_()))
    return base


def _features(batch: Any, cfg_json: dict[str, Any], root: str, root_text: str, eval_box: list[Any] | None) -> Any:
    import pyarrow as pa

    cfg, idx = _cfg(cfg_json), _get(eval_box, cache=True)
    tabs = [block_features(it["file"], it["start"], it["stop"], it["row0"], cfg, Path(root), idx, root_text)
            for it in batch.to_pylist()]
    return pa.concat_tables(tabs) if len(tabs) > 1 else tabs[0]


# -------------------------------------------------------------------------------------------------
# 2. the rules that compare rows (partition functions run in Ray workers)
# -------------------------------------------------------------------------------------------------
def _alive_rows(batch: Any, dead_box: list[Any], n: int, kinds: list[str] | None, part_of: str | None,
                parts: int, columns: list[str]) -> Any:
    """The rows of ``batch`` alive now (not in the broadcast bitmap), of ``kinds``, with a partition column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    dead = np.unpackbits(_get(dead_box), count=n).astype(bool)
    rows = batch.column("_row").to_numpy()
    keep = ~dead[rows]
    if kinds is not None:
        keep &= np.isin(batch.column("kind").to_numpy(zero_copy_only=False), kinds)
    t = batch.filter(pa.array(keep)).select(columns)
    if part_of is not None:
        h = np.asarray(pc.fill_null(t.column(part_of), 0).to_numpy(), dtype=np.uint64)
        t = t.append_column("_part", pa.array((h % np.uint64(parts)).astype(np.int64)))
    return t


def _exact_part(t: Any, image: bool, global_kinds: list[str] | None) -> Any:
    """The exact duplicates of one partition (all rows of a text digest are in one): ``exact_dup_image`` over
    its rows, then ``exact_dup_global`` over the rows of ``global_kinds`` still alive; each key's lowest row
    is kept, as the Polars path keeps the earliest row. Returns (_row, _reason, _detail)."""
    import pyarrow as pa

    from .dedup import first_of_groups_cols

    t = t.sort_by("_row")
    rows = t.column("_row").to_numpy()
    qa = t.column("kind").to_numpy(zero_copy_only=False) == "qa"
    tdig = t.column("_tdig").to_numpy()
    ids = t.column("id").to_pylist()
    out_r: list[int] = []
    out_s: list[str] = []
    out_d: list[str] = []
    alive = np.ones(len(rows), dtype=bool)
    if image:
        img = np.unique(np.asarray(t.column("_img").to_pylist(), dtype=object).astype(str), return_inverse=True)[1]
        first = first_of_groups_cols(img.astype(np.int64).ravel(), qa, tdig)
        for j in np.flatnonzero(first != np.arange(len(first))):
            out_r.append(int(rows[j]))
            out_s.append("exact_dup_image")
            out_d.append(f"same text as {ids[first[j]]} for the same image")
            alive[j] = False
    if global_kinds is not None:
        sel = np.flatnonzero(alive & np.isin(t.column("kind").to_numpy(zero_copy_only=False), global_kinds))
        if len(sel) >= 2:
            par = t.column("parent_id").to_pylist()
            first = first_of_groups_cols(qa[sel], tdig[sel])
            for j in np.flatnonzero(first != np.arange(len(first))):
                f = sel[first[j]]
                out_r.append(int(rows[sel[j]]))
                out_s.append("exact_dup_global")
                out_d.append(f"same text as {ids[f]} (image of {par[f]})")
    return pa.table({"_row": pa.array(out_r, type=pa.int64()), "_reason": pa.array(out_s, type=pa.string()),
                     "_detail": pa.array(out_d, type=pa.string())})


def _explode_bands(t: Any, parts: int) -> Any:
    """(band, key, row, partition) for every band of every row."""
    import pyarrow as pa

    lists = t.column("_bands").combine_chunks()
    rows = t.column("_row").to_numpy()
    lens = np.diff(lists.offsets.to_numpy())
    keys = lists.flatten().to_numpy()
    pos = np.arange(len(keys), dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
    band = pos.astype(np.int64)
    with np.errstate(over="ignore"):
        part = ((keys ^ (band.astype(np.uint64) * _P)) % np.uint64(parts)).astype(np.int64)
    return pa.table({"_band": band, "_key": pa.array(keys, type=pa.uint64()), "_row": np.repeat(rows, lens),
                     "_part": part})


def _band_part(t: Any, max_bucket_pairs: int) -> Any:
    """Candidate pairs (lower row, higher row) of the buckets (band, key) of one partition."""
    import pyarrow as pa

    from .dedup import bucket_pairs

    band = t.column("_band").to_numpy()
    key = t.column("_key").to_numpy()
    rows = t.column("_row").to_numpy()
    out = [np.zeros((0, 2), dtype=np.int64)]
    for b in np.unique(band):
        m = band == b
        if m.sum() >= 2:
            out.append(bucket_pairs(key[m], rows[m].astype(np.int64), max_bucket_pairs))
    p = np.concatenate(out)
    return pa.table({"a": pa.array(p[:, 0], type=pa.int64()), "b": pa.array(p[:, 1], type=pa.int64())})


def _rows_in(batch: Any, wanted_box: list[Any], columns: list[str], column: str = "_row") -> Any:
    """The rows of ``batch`` whose ``column`` is in the broadcast sorted array / set."""
    import pyarrow as pa

    wanted = _get(wanted_box)
    if isinstance(wanted, np.ndarray):
        keep = np.isin(batch.column(column).to_numpy(), wanted)
    else:
        keep = np.array([v in wanted for v in batch.column(column).to_pylist()], dtype=bool)
    return batch.filter(pa.array(keep, type=pa.bool_())).select(columns)


# -------------------------------------------------------------------------------------------------
# the driver
# -------------------------------------------------------------------------------------------------
class _Run:
    def __init__(self, ray: Any, feats: Any, n: int, cfg: CurationConfig, workers: int, parts: int) -> None:
        self.ray, self.feats, self.n, self.cfg, self.workers, self.parts = ray, feats, n, cfg, workers, parts
        self.reason = np.full(n, None, dtype=object)
        self.detail = np.full(n, None, dtype=object)
        self.stats: dict[str, Any] = {}
        self.pending: dict[str, dict[int, str]] = {}
        self.steps: list[Any] = []
        self.imgh = np.zeros(n, dtype=np.uint64)  # per row: a hash of the image key, and the image's pHash
        self.phash = np.zeros(n, dtype=np.uint64)
        self.kind_names: list[str] = []  # per row: the kind as a code into kind_names
        self.kind_code = np.zeros(n, dtype=np.int32)
        self.has_bands = np.zeros(n, dtype=bool)  # a near.kinds row with shingles, alive after the per-row rules

    def set_kinds(self, rows: np.ndarray, col: Any) -> None:
        enc = col.combine_chunks().dictionary_encode()
        for k in enc.dictionary.to_pylist():
            if k not in self.kind_names:
                self.kind_names.append(k)
        m = np.array([self.kind_names.index(k) for k in enc.dictionary.to_pylist()], dtype=np.int32)
        self.kind_code[rows] = m[enc.indices.to_numpy(zero_copy_only=False)]

    def of_kinds(self, kinds: list[str]) -> np.ndarray:
        return np.isin(self.kind_code, [i for i, k in enumerate(self.kind_names) if k in kinds])

    def mark(self, hits: dict[int, str], name: str) -> None:
        for r, d in hits.items():
            if self.reason[r] is None:  # alive rows only: the first failing rule names the drop
                self.reason[r] = name
                self.detail[r] = d

    def alive_box(self) -> list[Any]:
        return [self.ray.put(np.packbits(self.reason != None))]  # noqa: E711

    def collect(self, ds: Any) -> Any:
        import pyarrow as pa

        tabs = [b for b in ds.iter_batches(batch_format="pyarrow", batch_size=None) if b.num_rows]
        return pa.concat_tables(tabs) if tabs else None

    def alive(self, columns: list[str], kinds: list[str] | None = None, part_of: str | None = None) -> Any:
        return self.feats.map_batches(
            _alive_rows, batch_format="pyarrow", num_cpus=0.1, compute=self.ray.data.TaskPoolStrategy(size=self.workers),
            fn_kwargs={"dead_box": self.alive_box(), "n": self.n, "kinds": kinds, "part_of": part_of,
                       "parts": self.parts, "columns": columns})

    def shuffle(self, ds: Any, fn: Any, **kw: Any) -> Any:
        return self.collect(ds.groupby("_part", num_partitions=self.parts).map_groups(
            fn, batch_format="pyarrow", num_cpus=0.1, fn_kwargs=kw))

    def fetch(self, wanted: Any, columns: list[str], column: str = "_row") -> Any:
        return self.collect(self.feats.map_batches(
            _rows_in, batch_format="pyarrow", num_cpus=0.1, compute=self.ray.data.TaskPoolStrategy(size=self.workers),
            fn_kwargs={"wanted_box": [self.ray.put(wanted)], "columns": columns, "column": column}))


def _exact(run: _Run, which: str) -> dict[int, str]:
    """``exact_dup_image`` and ``exact_dup_global`` in one shuffle by text digest (both keys contain it); the
    second step's rows wait in ``run.pending`` for their turn in ``STEPS``."""
    if which == "global" and "exact_dup_global" in run.pending:
        return run.pending.pop("exact_dup_global")
    if int((run.reason == None).sum()) < 2:  # noqa: E711
        return {}
    cfg = run.cfg
    glob = list(set(cfg.exact.global_kinds))
    both = which == "image" and _next_group(run.steps, "exact_dup_image") == "exact_dup_global"
    ds = run.alive(["_row", "id", "parent_id", "kind", "_img", "_tdig"], part_of="_tdig")
    t = run.shuffle(ds, _exact_part, image=which == "image", global_kinds=glob if which == "global" or both else None)
    hits: dict[str, dict[int, str]] = {"exact_dup_image": {}, "exact_dup_global": {}}
    if t is not None:
        for r, why, d in zip(t.column("_row").to_pylist(), t.column("_reason").to_pylist(), t.column("_detail").to_pylist()):
            hits[why][r] = d
    if both:
        run.pending["exact_dup_global"] = hits["exact_dup_global"]
    return hits["exact_dup_image" if which == "image" else "exact_dup_global"]


def _next_group(steps: list[Any], name: str) -> str | None:
    names = [s.name for s in steps if s.group is not None]
    i = names.index(name)
    return names[i + 1] if i + 1 < len(names) else None


def _near(run: _Run) -> dict[int, str]:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from .dedup import first_of_groups, pair_jaccard

    c = run.cfg.near
    n_sel = int((run.of_kinds(list(c.kinds)) & (run.reason == None)).sum())  # noqa: E711
    if n_sel < 2:  # as the Polars path: no statistics then
        return {}
    run.stats["near"] = {"candidates": 0, "pairs_checked": 0, "pairs_linked": 0}
    if int((run.has_bands & (run.reason == None)).sum()) < 2:  # noqa: E711
        return {}
    ds = run.alive(["_row", "kind", "_bands"], kinds=list(c.kinds))
    ds = ds.map_batches(_explode_bands, batch_format="pyarrow", num_cpus=0.1, fn_kwargs={"parts": run.parts})
    t = run.shuffle(ds, _band_part, max_bucket_pairs=c.max_bucket_pairs)
    pairs = np.zeros((0, 2), dtype=np.int64) if t is None else np.stack(
        [t.column("a").to_numpy(), t.column("b").to_numpy()], axis=1).astype(np.int64)
    pairs = np.unique(pairs, axis=0)
    cand = np.unique(pairs)
    run.stats["near"] = {"candidates": int(len(cand)), "pairs_checked": int(len(pairs)), "pairs_linked": 0}
    if len(pairs) == 0:
        return {}
    f = run.fetch(cand, ["_row", "id", "_sh"]).sort_by("_row")
    rows = f.column("_row").to_numpy()
    sh_arr = f.column("_sh").combine_chunks()
    soff = sh_arr.offsets.to_numpy().astype(np.int64)
    soff = soff - soff[0]
    sh = sh_arr.flatten().to_numpy().astype(np.uint64)
    local = np.searchsorted(rows, pairs)
    jac = pair_jaccard(sh, soff, local)
    ok = jac >= c.threshold
    linked = local[ok]
    run.stats["near"]["pairs_linked"] = int(len(linked))
    if len(linked) == 0:
        return {}
    m = len(rows)
    g = coo_matrix((np.ones(len(linked), dtype=np.int8), (linked[:, 0], linked[:, 1])), shape=(m, m))
    _, labels = connected_components(g, directed=False)
    rep = first_of_groups(labels.astype(np.int64))  # local positions ascend with row order
    best = np.zeros(m, dtype=np.float32)
    np.maximum.at(best, linked[:, 0], jac[ok])
    np.maximum.at(best, linked[:, 1], jac[ok])
    ids = f.column("id").to_pylist()
    return {int(rows[j]): f"near-duplicate of {ids[rep[j]]} (shingle Jaccard {best[j]:.2f} with a row of its cluster)"
            for j in np.flatnonzero(rep != np.arange(m))}


def _image_near(run: _Run) -> dict[int, str]:
    """pHash near-duplicate images over the distinct images of the rows alive now, on the driver (the per-row
    image key hash and pHash came back from the block pass): each image's first alive row, in row order,
    then :func:`~cocoa.curation.images.phash_clusters` as in the Polars path."""
    from .images import phash_clusters

    alive = np.flatnonzero(run.reason == None)  # noqa: E711
    if len(alive) < 2:
        return {}
    _, first = np.unique(run.imgh[alive], return_index=True)
    first = np.sort(first)  # distinct images in the order of their first alive row
    ph = run.phash[alive[first]]
    keep = first[ph != 0]
    if len(keep) < 2:
        return {}
    rep = phash_clusters(run.phash[alive[keep]], run.cfg.image.phash_distance)
    drop = np.flatnonzero(rep != np.arange(len(rep)))
    if len(drop) == 0:
        return {}
    rep_rows = alive[keep[rep[drop]]]
    f = run.fetch(np.unique(rep_rows), ["_row", "parent_id"])
    parent = dict(zip(f.column("_row").to_pylist(), f.column("parent_id").to_pylist()))
    bad = {int(run.imgh[alive[keep[i]]]): parent[int(r)] for i, r in zip(drop, rep_rows)}
    hit = alive[np.isin(run.imgh[alive], np.array(list(bad), dtype=np.uint64))]
    return {int(r): f"image is a pHash near-duplicate of the image of {bad[int(run.imgh[r])]}" for r in hit}


_GROUP = {
    "exact_dup_image": lambda run: _exact(run, "image"),
    "exact_dup_global": lambda run: _exact(run, "global"),
    "near_dup": _near,
    "image_near_dup": _image_near,
}


def run_curation_ray(data: str | Path = "shards", config: CurationConfig | None = None,
                     eval_data: str | Path | None = None, show_progress: bool = True, console: Any = None,
                     address: str | None = None, workers: int = 4, block_rows: int = 50_000) -> Any:
    """:func:`cocoa.curation.pipeline.run_curation` on Ray Data (see the module docstring): the same
    ``curated/``, ``curated/rejected/`` rows and report counts."""
    from .output import workspace_lock

    ws = Workspace(data)
    with workspace_lock(ws.root, "cocoa-data curate", f"there is no {ws.synthetic} to curate; run `cocoa-data synth "
                        f"--out {ws.root}` first"):
        return _run(ws, config or CurationConfig(), eval_data, show_progress, console, address, workers, block_rows)


def _run(ws: Workspace, cfg: CurationConfig, eval_data: Any, show_progress: bool, console: Any,
         address: str | None, workers: int, block_rows: int) -> Any:
    from .inputs import dataset_checksum, open_checked
    from .output import check_replaceable, staged_output
    from .pipeline import CurationResult, _no_rows_message, make_progress
    from .report import build_report
    from .rules import STEPS
    from .rules.contamination import decontaminate_original

    import pyarrow as pa
    import pyarrow.compute as pc

    pl = _pl()
    check_steps(STEPS)
    ray = _import_ray()
    t_start = time.perf_counter()
    ds = open_checked(ws.synthetic, "SynthRecord", "synthetic data",
                      f"run `cocoa-data synth --out {ws.root}` first (it writes {ws.synthetic})")
    if len(ds) == 0:
        raise ShardError(_no_rows_message(ws))
    check_replaceable(ws.curated, "cocoa-data curate")
    timings: dict[str, float] = {}
    eval_index = None
    if eval_data is not None:
        from .decontam import build_eval_index

        t0 = time.perf_counter()
        eval_index = build_eval_index(eval_data, cfg.decontam.ngram, cfg.image.max_pixels, cfg.decontam.template_texts)
        if not eval_index.usable():
            top = sorted(eval_index.problems.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
            why = (f": {', '.join(f'{r} {n}' for r, n in top)} (e.g. {eval_index.unreadable[0]})"
                   if top else ": no readable eval image and no eval text long enough to compare "
                   f"({cfg.decontam.ngram} words)")
            raise ShardError(f"--eval-data {eval_data} yields nothing to decontaminate against{why}; fix the "
                             "eval data (`cocoa-data inspect` it) or point --eval-data at another directory")
        timings["eval_index"] = round(time.perf_counter() - t0, 3)
    # blocks: (shard, row range, global index of its first row)
    items, row0 = [], 0
    for f, s in zip(ds.files, ds.manifest.shards):
        for a in range(0, s.num_rows, block_rows):
            b = min(a + block_rows, s.num_rows)
            items.append({"file": str(f.resolve()), "start": a, "stop": b, "row0": row0 + a})
        row0 += s.num_rows
    n = row0
    started = _connect(ray, address)
    progress = make_progress(console, show_progress)
    try:
        from ray.data.context import ShuffleStrategy

        dctx = ray.data.DataContext.get_current()
        saved = (dctx.enable_progress_bars, dctx.shuffle_strategy)
        dctx.enable_progress_bars = False  # cocoa's own bar reports progress
        # task-based shuffles: no aggregator actors to start (the hash shuffle's took ~8 s per run on 2 cores)
        dctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
        with progress:
            task = progress.add_task("rules (ray)", total=len(STEPS) + 1)
            t0 = time.perf_counter()
            eval_box = [ray.put(eval_index)] if eval_index is not None else None
            feats = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                _features, batch_size=1, batch_format="pyarrow", num_cpus=0.1, compute=ray.data.TaskPoolStrategy(size=workers),
                fn_kwargs={"cfg_json": cfg.model_dump(mode="json"), "root": str(ds.path.resolve()), "root_text": str(ds.path),
                           "eval_box": eval_box}).materialize()
            parts = max(2, min(4 * workers, -(-n // 200_000)))
            run = _Run(ray, feats, n, cfg, workers, parts)
            run.steps = [s for s in STEPS if s.enabled(cfg)]
            rowwise: dict[str, dict[int, str]] = {k: {} for k in ROWWISE}
            cols = ["_row", "kind", "_imgh", "img_phash", "_hasb", REASON, DETAIL, *("_g_" + k for k in ROWWISE)]
            for b in feats.select_columns(cols).iter_batches(batch_format="pyarrow", batch_size=None):
                rows = b.column("_row").to_numpy()
                run.set_kinds(rows, b.column("kind"))
                run.imgh[rows] = b.column("_imgh").to_numpy()
                run.phash[rows] = b.column("img_phash").to_numpy()
                run.has_bands[rows] = b.column("_hasb").to_numpy(zero_copy_only=False)
                for col, dest in ((REASON, None), *(("_g_" + k, rowwise[k]) for k in ROWWISE)):
                    j = np.flatnonzero(pc.is_valid(b.column(col)).to_numpy(zero_copy_only=False))
                    if not len(j):
                        continue
                    vals = b.column(col).take(pa.array(j)).to_pylist()
                    if dest is None:  # a per-row rule failed (the block pass applied them in order)
                        run.reason[rows[j]] = vals
                        run.detail[rows[j]] = b.column(DETAIL).take(pa.array(j)).to_pylist()
                    else:
                        dest.update(zip(rows[j].tolist(), vals))
            timings["blocks (ray)"] = round(time.perf_counter() - t0, 3)
            progress.advance(task)
            for step in STEPS:  # the rules that compare rows, in order, each after the ones before it
                progress.advance(task)
                if step.expr is not None or not step.enabled(cfg):
                    continue
                if step.name.startswith("decontam") and eval_index is None:
                    continue
                t0 = time.perf_counter()
                if step.name in ROWWISE:
                    run.mark(rowwise[step.name], step.name)
                else:
                    run.mark(_GROUP[step.name](run), step.name)
                timings[step.name + " (ray)"] = round(time.perf_counter() - t0, 3)
            n_images = int(len(np.unique(run.imgh)))
            orig_rows: list[dict[str, Any]] = []
            orig_report: dict[str, Any] = {"note": "no --eval-data: original rows were not decontaminated"}
            if eval_index is not None:
                t0 = time.perf_counter()
                orig_rows, orig_report = decontaminate_original(ws, cfg, eval_index, cfg.image.max_pixels, progress)
                timings["decontam_original"] = round(time.perf_counter() - t0, 3)
            # the report's examples: the first rows of each rule, their id and text
            is_rej = run.reason != None  # noqa: E711
            ex_rows: list[int] = []
            for s in STEPS:
                ex_rows += np.flatnonzero(is_rej & (run.reason == s.name))[:cfg.examples].tolist()
            ex = run.fetch(np.array(sorted(ex_rows), dtype=np.int64), ["_row", "id", "text"]) if ex_rows else None
    finally:
        if "saved" in locals():
            dctx.enable_progress_bars, dctx.shuffle_strategy = saved
        if started:
            ray.shutdown()

    # --- write curated/ and curated/rejected/ (the Polars path's writer and shard sizes) ---------------------
    t0 = time.perf_counter()
    keep_idx = np.flatnonzero(~is_rej)
    rej_idx = np.flatnonzero(is_rej)
    in_ck = dataset_checksum(ws.synthetic)
    orig_ck = dataset_checksum(ws.original) if (ws.original / MANIFEST).is_file() else None
    prov = {"stage": "curate", "input": in_ck, "original": orig_ck, "config": cfg.model_dump(mode="json"),
            "eval_data": None if eval_data is None else str(eval_data)}
    ids = np.full(n, None, dtype=object)
    texts = np.full(n, None, dtype=object)
    if ex is not None:
        r = ex.column("_row").to_numpy()
        ids[r] = ex.column("id").to_pylist()
        texts[r] = ex.column("text").to_pylist()
    df = pl.DataFrame({"id": pl.Series(ids.tolist(), dtype=pl.String), "kind": pl.Series(run.kind_names, dtype=pl.String).gather(run.kind_code),
                       "text": pl.Series(texts.tolist(), dtype=pl.String),
                       REASON: pl.Series(run.reason.tolist(), dtype=pl.String),
                       DETAIL: pl.Series(run.detail.tolist(), dtype=pl.String)})
    with staged_output(ws.curated, "curated", "cocoa-data curate") as stage:
        _write(stage, prov, ds, cfg, keep_idx, rej_idx, run.reason, df[DETAIL], orig_rows)
        timings["write"] = round(time.perf_counter() - t0, 3)
        ctx = Context(cfg=cfg, df=df, stats=run.stats)
        report = build_report(ws, df, ctx, cfg, eval_data, eval_index, orig_report, in_ck, keep_idx, rej_idx, n_images,
                              timings, t_start)
        report["engine"] = {"name": "ray", "workers": workers, "blocks": len(items), "partitions": run.parts}
        report["warnings"] = [w for w in [eval_index.warning() if eval_index is not None else None] if w]
        atomic_write_json(stage / "report.json", report)
    return CurationResult(report=report, kept=int(len(keep_idx)), rejected=int(len(rej_idx)) + len(orig_rows))


def _write(stage: Path, prov: dict[str, Any], ds: Any, cfg: CurationConfig, keep_idx: np.ndarray,
           rej_idx: np.ndarray, reasons: np.ndarray, det: Any, orig_rows: list[dict[str, Any]]) -> None:
    """``curated/`` and ``rejected/`` as the Polars path writes them (same rows, order and shard boundaries),
    taking the rows from the memory-mapped input shards chunk by chunk."""
    import pyarrow as pa

    from ..records import canonical_json
    from ..shards import ShardWriter
    from .inputs import pa_indices
    from .rejected import quarantine_table, synth_payloads
    from .text import normalize_series

    pl = _pl()
    table = ds.table()  # memory-mapped
    with ShardWriter(stage, "SynthRecord", mode="create", provenance=prov) as w:
        for s in range(0, len(keep_idx), w.max_rows):  # one shard per chunk, as write_table(kept) slices
            kept = table.take(pa_indices(keep_idx[s:s + w.max_rows]))
            if cfg.text.normalize:
                for c in ("caption", "question", "answer"):
                    col = normalize_series(pl.from_arrow(kept.column(c).combine_chunks()).cast(pl.String))
                    kept = kept.set_column(kept.schema.get_field_index(c), c, pa.array(col.to_list(), type=pa.string()))
            w.write_table(kept)
    with ShardWriter(stage / "rejected", "QuarantineRecord", mode="create", provenance=prov) as w:
        for s in range(0, len(rej_idx), 20_000):
            part = rej_idx[s:s + 20_000]
            tab = table.take(pa_indices(part))
            kinds, sources = tab.column("kind").to_pylist(), tab.column("source").to_pylist()
            w.write_table(quarantine_table(
                [str(reasons[r]) for r in part], [d or "" for d in det.gather(part).to_list()],
                tab.column("id").to_pylist(), tab.column("key").to_pylist(), tab.column("parent_id").to_pylist(),
                synth_payloads(tab),
                [canonical_json({"input": "synthetic", "kind": k, "source": so}) for k, so in zip(kinds, sources)],
            ))
        for row in orig_rows:
            w.write_row(row)
