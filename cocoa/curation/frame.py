"""The curation frame: one Polars row per synthetic record with the features every rule reads.

:func:`load_frame` reads the ids and text fields (normalised), the validity detail
(:func:`cocoa.curation.rules.validity.record_problems`) and the image key and image features (one
analysis per distinct image); :func:`text_features` adds word hashes (kept flat for near-duplicate and
decontamination checks), word counts per field, the repetition features and the exact-duplicate digest.
Each is one pass over the data, shared by the rule families that read its columns.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xxhash

from ..shards import ShardDataset
from .config import CurationConfig
from .dedup import text_digests
from .images import ImageTable
from .rules.validity import record_problems
from .steps import _pl
from .text import longest_repeat, normalize_series, repeated_share, word_hashes


def load_frame(ds: ShardDataset, cfg: CurationConfig, progress: Any = None):  # type: ignore[no-untyped-def]
    """One row per synthetic record: ids, normalised text fields, image key + image features."""
    pl = _pl()
    cols = ["id", "parent_id", "source", "kind", "caption", "question", "answer", "key"]
    df = ds.scan().select(cols).with_row_index("_row").collect()
    df = df.with_columns(record_problems(ds), pl.col("kind").fill_null(""), pl.col("id").fill_null(""))
    if cfg.text.normalize:
        df = df.with_columns(normalize_series(df[c]).alias(c) for c in ("caption", "question", "answer"))
    df = df.with_columns(
        text=pl.when(pl.col("kind") == "qa")
        .then(pl.concat_str([pl.col("question").fill_null(""), pl.col("answer").fill_null("")], separator=" "))
        .otherwise(pl.col("caption").fill_null("")),
    )

    # image keys (content digest) and features, once per distinct image
    table = ImageTable(max_pixels=cfg.image.max_pixels)
    key_ids: dict[str, int] = {}
    keys_l: list[np.ndarray] = []
    ids_l: list[np.ndarray] = []
    task = progress.add_task("images", total=len(ds)) if progress else None
    for f in ds.files:
        row_keys = image_keys(ds._open(f).read_all().column("image"), table, key_ids, ds.path)
        keys_l.append(row_keys)
        ids_l.append(np.fromiter((key_ids[k] for k in row_keys), dtype=np.int64, count=len(row_keys)))
        if progress:
            progress.advance(task, len(row_keys))
    keys = np.concatenate(keys_l) if keys_l else np.zeros(0, dtype=object)
    df = df.with_columns(pl.Series("_img", keys.tolist(), dtype=pl.String),
                         pl.Series("_img_id", np.concatenate(ids_l) if ids_l else np.zeros(0, dtype=np.int64)))
    df = df.join(table.frame(), on="_img", how="left", maintain_order="left")
    return df, len(table.infos)


def image_keys(col, table: ImageTable, key_ids: dict[str, int], root: Any) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The image key of every row of an Arrow ``image`` column (object array): the xxh3-128 of the bytes, or
    ``"path:" + path``. Each key not in ``key_ids`` yet is numbered there and added to ``table`` (analysed
    once). Arrow finds the distinct byte strings (hash-based, in C++); only those are digested."""
    import pyarrow.compute as pc

    raw = pc.struct_field(col, "bytes")
    paths = pc.struct_field(col, "path")
    uniq = pc.unique(raw)
    idx = pc.index_in(raw, value_set=uniq, skip_nulls=True).to_numpy(zero_copy_only=False)
    ukeys = []
    for b in uniq.to_pylist():
        if b is None:
            ukeys.append(None)
            continue
        k = xxhash.xxh3_128_hexdigest(b)
        if k not in key_ids:
            key_ids[k] = len(key_ids)
            table.add(k, {"bytes": b, "path": None}, root)
        ukeys.append(k)
    row_keys = np.array(ukeys + [None], dtype=object)[np.nan_to_num(idx, nan=len(ukeys)).astype(np.int64)]
    if raw.null_count:
        for j in np.flatnonzero(pd_isnull(row_keys)):
            p = paths[int(j)].as_py()
            k = "path:" + (p or "")
            if k not in key_ids:
                key_ids[k] = len(key_ids)
                table.add(k, {"bytes": None, "path": p}, root)
            row_keys[j] = k
    return row_keys


def text_features(df, cfg: CurationConfig, progress: Any = None):  # type: ignore[no-untyped-def]
    """Word hashes of ``text`` (flat + offsets), word counts per field and the repetition features."""
    pl = _pl()
    flats, lens = [], []
    share_l, count_l, run_l, a_l = [], [], [], []
    n = df.height
    task = progress.add_task("text features", total=n) if progress else None
    for s in range(0, max(n, 1), cfg.batch_rows):
        part = df.slice(s, cfg.batch_rows)
        f, o = word_hashes(part["text"])
        flats.append(f)
        n_all = np.diff(o)
        lens.append(n_all)
        is_qa = (part["kind"] == "qa").to_numpy()
        a_w = np.diff(word_hashes(part["answer"])[1]) if is_qa.any() else np.zeros(part.height, dtype=np.int64)
        a_w = np.where(is_qa, np.minimum(a_w, n_all), 0)
        a_l.append(a_w)
        # repetition is judged on the caption, or on the answer of a QA row: the answer's words are the
        # last ``a_words`` words of ``text`` (= question + " " + answer)
        n_rep = np.where(is_qa, a_w, n_all)
        rf, ro = tail_words(f, o, n_rep)
        sh, cnt = repeated_share(rf, ro, cfg.repetition.ngram)
        share_l.append(sh)
        count_l.append(cnt)
        run_l.append(longest_repeat(rf, ro))
        if progress:
            progress.advance(task, part.height)
    flat = np.concatenate(flats) if flats else np.zeros(0, dtype=np.uint64)
    ln = np.concatenate(lens) if lens else np.zeros(0, dtype=np.int64)
    a_words = np.concatenate(a_l) if a_l else np.zeros(0, dtype=np.int64)
    off = np.zeros(len(ln) + 1, dtype=np.int64)
    np.cumsum(ln, out=off[1:])
    is_qa = (df["kind"] == "qa").to_numpy()
    tdig = text_digests(df["text"].str.to_lowercase())  # exact-duplicate key (stable xxh3-64)
    df = df.with_columns(
        pl.Series("_tdig", tdig),
        pl.Series("cap_words", np.where(is_qa, 0, ln).astype(np.int64)),
        pl.Series("q_words", np.where(is_qa, ln - a_words, 0).astype(np.int64)),
        pl.Series("a_words", a_words.astype(np.int64)),
        pl.Series("rep_share", np.concatenate(share_l) if share_l else np.zeros(0)),
        pl.Series("rep_ngrams", np.concatenate(count_l) if count_l else np.zeros(0, dtype=np.int64)),
        pl.Series("rep_run", np.concatenate(run_l) if run_l else np.zeros(0, dtype=np.int64)),
    )
    return df, (flat, off)


def tail_words(flat: np.ndarray, offsets: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The last ``n[i]`` words of each row."""
    new_off = np.zeros(len(n) + 1, dtype=np.int64)
    np.cumsum(n, out=new_off[1:])
    if new_off[-1] == 0:
        return np.zeros(0, dtype=np.uint64), new_off
    starts = offsets[1:] - n
    idx = np.repeat(starts - new_off[:-1], n) + np.arange(new_off[-1], dtype=np.int64)
    return flat[idx], new_off


def pd_isnull(a: np.ndarray) -> np.ndarray:
    return np.array([x is None for x in a], dtype=bool) if a.dtype == object else np.zeros(len(a), dtype=bool)
