"""Exact and near-duplicate detection.

Exact: an xxh3-64 digest of the normalised text (stable across versions, unlike Polars' ``hash``).

Near: MinHash signatures from ``rensa`` over word shingles, LSH banding in ``rensa``'s index to find
the rows that have any candidate at all (usually a small share), then, for those rows only,
candidate pairs per band, verification by the signatures' estimated Jaccard, and connected
components (scipy). One row per component is kept: the earliest in input order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xxhash

from .text import ngrams


def text_digests(texts: list[str | None]) -> np.ndarray:
    """Stable uint64 digests (xxh3-64) of strings; None hashes as ''."""
    return np.fromiter((xxhash.xxh3_64_intdigest((t or "").encode()) for t in texts), dtype=np.uint64, count=len(texts))


def first_of_groups(keys: np.ndarray) -> np.ndarray:
    """For each position, the position of the first row with the same key (itself if first)."""
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    start = np.ones(len(sk), dtype=bool)
    start[1:] = sk[1:] != sk[:-1]
    grp = np.cumsum(start) - 1
    firsts = order[start]  # stable sort: the earliest position of each key
    out = np.empty(len(keys), dtype=np.int64)
    out[order] = firsts[grp]
    return out


@dataclass
class NearDupResult:
    rep: np.ndarray  # for each row, the row kept for its cluster (itself when kept)
    similarity: np.ndarray  # estimated Jaccard to a linked neighbour (0 for singletons)
    candidates: int  # rows with any LSH candidate
    pairs_checked: int
    pairs_linked: int


def _signatures(flat: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int):  # type: ignore[no-untyped-def]
    import rensa

    return rensa.RMinHash.digest_matrix_from_flat_token_hashes(flat, offsets, num_perm, seed)


def _subset(flat: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lens = np.diff(offsets)[rows]
    new_off = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lens, out=new_off[1:])
    if len(rows) == 0 or new_off[-1] == 0:
        return np.zeros(0, dtype=np.uint64), new_off
    starts = offsets[:-1][rows]
    idx = np.repeat(starts - new_off[:-1], lens) + np.arange(new_off[-1], dtype=np.int64)
    return flat[idx], new_off


def near_duplicates(
    flat_words: np.ndarray,
    offsets: np.ndarray,
    *,
    shingle: int = 3,
    num_perm: int = 128,
    bands: int = 16,
    threshold: float = 0.7,
    seed: int = 0,
    max_bucket_pairs: int = 64,
    chunk: int = 200_000,
) -> NearDupResult:
    """Cluster rows whose word-shingle sets have estimated Jaccard >= ``threshold``.

    ``flat_words``/``offsets``: word hashes per row (see :func:`cocoa.curation.text.word_hashes`).
    Rows with no words are never duplicates here (the length rules handle them).
    """
    import polars as pl
    import rensa
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(offsets) - 1
    rep = np.arange(n, dtype=np.int64)
    sim = np.zeros(n, dtype=np.float32)
    if n < 2:
        return NearDupResult(rep, sim, 0, 0, 0)
    sh, soff = ngrams(flat_words, offsets, shingle, short="unigrams")
    nonempty = np.flatnonzero(np.diff(soff) > 0)
    if len(nonempty) < 2:
        return NearDupResult(rep, sim, 0, 0, 0)
    sh, soff = _subset(sh, soff, nonempty)
    m = len(nonempty)

    # 1) rensa LSH: which rows share any band with another row
    lsh = rensa.RMinHashLSH(threshold, num_perm, bands)
    mats = []
    for s in range(0, m, chunk):
        e = min(m, s + chunk)
        f, o = _subset(sh, soff, np.arange(s, e))
        mat = _signatures(f, o, num_perm, seed)
        lsh.insert_matrix(mat, s)
        mats.append(mat)
    flags = np.concatenate([np.asarray(lsh.query_duplicate_flags_matrix(mat), dtype=bool) for mat in mats])
    del mats, lsh
    cand = np.flatnonzero(flags)
    if len(cand) < 2:
        return NearDupResult(rep, sim, int(len(cand)), 0, 0)

    # 2) signatures of the candidate rows only, as a numpy matrix
    parts = []
    for s in range(0, len(cand), 50_000):
        f, o = _subset(sh, soff, cand[s:s + 50_000])
        parts.append(np.asarray(_signatures(f, o, num_perm, seed).to_rows(), dtype=np.uint32))
    sig = np.concatenate(parts)
    del parts

    # 3) candidate pairs per band (all pairs in small buckets, a star in big ones)
    r = num_perm // bands
    pairs = []
    with np.errstate(over="ignore"):
        for b in range(bands):
            block = sig[:, b * r:(b + 1) * r].astype(np.uint64)
            key = np.zeros(len(cand), dtype=np.uint64)
            for j in range(r):
                key = (key * np.uint64(0x100000001B3)) ^ block[:, j]
                key ^= key >> np.uint64(31)
            df = pl.DataFrame({"k": key, "i": np.arange(len(cand), dtype=np.int64)})
            sizes = df.group_by("k").agg(pl.len().alias("n"), pl.col("i").min().alias("first"))
            df = df.join(sizes.filter(pl.col("n") > 1), on="k")
            if df.height == 0:
                continue
            small = df.filter(pl.col("n") <= max_bucket_pairs).select("k", "i")
            if small.height:
                pp = small.join(small, on="k", suffix="_b").filter(pl.col("i") < pl.col("i_b"))
                pairs.append(np.stack([pp["i"].to_numpy(), pp["i_b"].to_numpy()], axis=1))
            big = df.filter(pl.col("n") > max_bucket_pairs).filter(pl.col("i") != pl.col("first"))
            if big.height:
                pairs.append(np.stack([big["first"].to_numpy(), big["i"].to_numpy()], axis=1))
    if not pairs:
        return NearDupResult(rep, sim, int(len(cand)), 0, 0)
    allp = np.unique(np.concatenate(pairs), axis=0)

    # 4) verify with the signatures' estimated Jaccard
    est = np.empty(len(allp), dtype=np.float32)
    for s in range(0, len(allp), 200_000):
        a, b = allp[s:s + 200_000, 0], allp[s:s + 200_000, 1]
        est[s:s + 200_000] = (sig[a] == sig[b]).mean(axis=1)
    ok = est >= threshold
    linked = allp[ok]
    if len(linked) == 0:
        return NearDupResult(rep, sim, int(len(cand)), int(len(allp)), 0)

    # 5) connected components; keep the earliest row of each
    k = len(cand)
    g = coo_matrix((np.ones(len(linked), dtype=np.int8), (linked[:, 0], linked[:, 1])), shape=(k, k))
    _, labels = connected_components(g, directed=False)
    firsts = first_of_groups(labels.astype(np.int64))  # cand is ascending: first = earliest row
    rows = nonempty[cand]
    rep[rows] = rows[firsts]
    best = np.zeros(k, dtype=np.float32)
    np.maximum.at(best, linked[:, 0], est[ok])
    np.maximum.at(best, linked[:, 1], est[ok])
    sim[rows] = best
    return NearDupResult(rep, sim, int(len(cand)), int(len(allp)), int(len(linked)))
