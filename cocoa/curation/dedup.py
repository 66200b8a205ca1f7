"""Exact and near-duplicate detection.

Exact: an xxh3-64 digest of the normalised text (stable across versions, unlike Polars' ``hash``).

Near: MinHash sketches from ``rensa`` over word shingles, one sketch per LSH band; per band, rensa's
LSH flags the rows that collide with another row (usually a small share) and only those rows' band
values leave Rust to form candidate pairs; pairs are verified by the exact Jaccard of their shingle
sets and linked into connected components (scipy). One row per component is kept: the earliest in
input order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xxhash

from .text import ngrams


def text_digests(texts) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Stable uint64 digests (xxh3-64 of UTF-8) of strings, a list or a Polars String Series; None and ''
    get 0. A Series is hashed from its UTF-8 bytes in blocks (no ``str`` object per row)."""
    h = xxhash.xxh3_64_intdigest
    if isinstance(texts, list):
        return np.fromiter((h(t.encode()) if t else 0 for t in texts), dtype=np.uint64, count=len(texts))
    import polars as pl

    texts = texts.cast(pl.String)
    out = np.empty(len(texts), dtype=np.uint64)
    for s in range(0, len(texts), 200_000):
        b = texts.slice(s, 200_000).fill_null("").cast(pl.Binary).to_list()
        out[s:s + len(b)] = np.fromiter(map(h, b), dtype=np.uint64, count=len(b))
    out[texts.str.len_bytes().fill_null(0).to_numpy() == 0] = 0
    return out


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


def first_of_groups_cols(*cols: np.ndarray) -> np.ndarray:
    """Like :func:`first_of_groups` for a key made of several columns (exact comparison, no hashing)."""
    n = len(cols[0]) if cols else 0
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort(tuple(reversed(cols)))  # stable: equal keys keep input order
    start = np.zeros(n, dtype=bool)
    start[0] = True
    for c in cols:
        sc = c[order]
        start[1:] |= sc[1:] != sc[:-1]
    grp = np.cumsum(start) - 1
    out = np.empty(n, dtype=np.int64)
    out[order] = order[start][grp]
    return out


@dataclass
class NearDupResult:
    rep: np.ndarray  # for each row, the row kept for its cluster (itself when kept)
    similarity: np.ndarray  # best exact Jaccard to a linked neighbour (0 for singletons)
    candidates: int  # rows whose band collides with another row in some band
    pairs_checked: int
    pairs_linked: int


def _signatures(flat: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int):  # type: ignore[no-untyped-def]
    import rensa

    return rensa.RMinHash.digest_matrix_from_flat_token_hashes(flat, offsets, num_perm, seed)


def _matrix_values(mat, rows: int, r: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    """A rensa digest matrix as a ``rows x r`` uint64 array (rensa hands it out as lists of ints only)."""
    from itertools import chain

    return np.fromiter(chain.from_iterable(mat.to_rows()), dtype=np.uint64, count=rows * r).reshape(rows, r)


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
) -> NearDupResult:
    """Cluster rows whose word-shingle sets have Jaccard >= ``threshold``.

    ``flat_words``/``offsets``: word hashes per row (see :func:`cocoa.curation.text.word_hashes`).
    The ``num_perm`` MinHash permutations are drawn as ``bands`` independent rensa sketches of
    ``num_perm / bands`` permutations each (one per band). For each band, rensa's LSH flags the rows
    whose band collides with another row's (one Rust pass, no per-row Python); only those rows' band
    values are exported to group them into candidate pairs. Pairs are verified with the exact Jaccard
    of their shingle sets, then linked into connected components. Rows with no words never match.
    """
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
    if len(nonempty) < n:  # (no copy when every row has words)
        sh, soff = _subset(sh, soff, nonempty)
    m = len(nonempty)
    r = num_perm // bands

    # 1) candidate pairs, band by band
    pairs = []
    flagged = np.zeros(m, dtype=bool)
    for b in range(bands):
        bseed = seed * 1_000_003 + b
        mat = _signatures(sh, soff, r, bseed)
        flags = np.asarray(rensa.RMinHashLSH(threshold, r, 1).query_duplicate_flags_matrix_one_shot(mat), dtype=bool)
        del mat
        rows = np.flatnonzero(flags)
        if len(rows) < 2:
            continue
        flagged[rows] = True
        f, o = _subset(sh, soff, rows)
        key = band_keys(_matrix_values(_signatures(f, o, r, bseed), len(rows), r))
        pairs.append(bucket_pairs(key, rows.astype(np.int64), max_bucket_pairs))
    n_flagged = int(flagged.sum())
    if not pairs:
        return NearDupResult(rep, sim, n_flagged, 0, 0)
    cat = np.concatenate(pairs)
    flat_key = np.unique(cat[:, 0] * np.int64(m) + cat[:, 1])
    allp = np.stack([flat_key // m, flat_key % m], axis=1)

    # 2) verify with the exact Jaccard of the shingle sets
    jac = pair_jaccard(sh, soff, allp)
    ok = jac >= threshold
    linked = allp[ok]
    if len(linked) == 0:
        return NearDupResult(rep, sim, n_flagged, int(len(allp)), 0)

    # 3) connected components; keep the earliest row of each
    g = coo_matrix((np.ones(len(linked), dtype=np.int8), (linked[:, 0], linked[:, 1])), shape=(m, m))
    _, labels = connected_components(g, directed=False)
    firsts = first_of_groups(labels.astype(np.int64))  # positions ascend with input order
    rep[nonempty] = nonempty[firsts]
    best = np.zeros(m, dtype=np.float32)
    np.maximum.at(best, linked[:, 0], jac[ok])
    np.maximum.at(best, linked[:, 1], jac[ok])
    sim[nonempty] = best
    return NearDupResult(rep, sim, n_flagged, int(len(allp)), int(len(linked)))


def band_keys(vals: np.ndarray) -> np.ndarray:
    """One uint64 key per row of a band's MinHash values (``rows x r``): rows with equal band values share it."""
    key = np.zeros(len(vals), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(vals.shape[1] if vals.ndim == 2 else 0):
            key = (key * np.uint64(0x100000001B3)) ^ vals[:, j]
            key ^= key >> np.uint64(29)
    return key


def bucket_pairs(key: np.ndarray, ids: np.ndarray, max_bucket_pairs: int) -> np.ndarray:
    """Pairs of ``ids`` sharing a ``key``: all pairs in buckets up to ``max_bucket_pairs`` rows,
    a star around the smallest id in larger ones (bounded work on huge buckets)."""
    order = np.lexsort((ids, key))
    k, i = key[order], ids[order]
    start = np.ones(len(k), dtype=bool)
    start[1:] = k[1:] != k[:-1]
    bstart = np.flatnonzero(start)
    sizes = np.diff(np.append(bstart, len(k)))
    out = []
    # pairs at distance d inside each bucket, for d = 1 .. max bucket size - 1 (all pairs)
    small = sizes <= max_bucket_pairs
    grp = np.repeat(np.arange(len(bstart)), sizes)
    pos = np.arange(len(k)) - bstart[grp]
    in_small = small[grp]
    for d in range(1, int(sizes[small].max()) if small.any() else 1):
        j = np.flatnonzero(in_small[d:] & (pos[d:] >= d)) + d
        if len(j) == 0:
            break
        out.append(np.stack([i[j - d], i[j]], axis=1))
    big = ~in_small & (pos > 0)
    if big.any():
        first = i[bstart[grp]]
        out.append(np.stack([first[big], i[big]], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)


def _mix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(33))) * np.uint64(0xFF51AFD7ED558CCD)
        return x ^ (x >> np.uint64(33))


def _uniq(x: np.ndarray) -> np.ndarray:
    x = np.sort(x)
    keep = np.ones(len(x), dtype=bool)
    keep[1:] = x[1:] != x[:-1]
    return x[keep]


def _uniq_index(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(x, kind="stable")
    xs = x[order]
    keep = np.ones(len(xs), dtype=bool)
    keep[1:] = xs[1:] != xs[:-1]
    return xs[keep], order[keep]


def pair_jaccard(flat: np.ndarray, offsets: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Exact Jaccard of the hash sets of rows ``pairs[:, 0]`` and ``pairs[:, 1]`` (numpy, no Python loop)."""
    if len(pairs) == 0:
        return np.zeros(0, dtype=np.float32)
    salt = np.uint64(0x9E3779B97F4A7C15)
    p = np.arange(len(pairs), dtype=np.int64)

    def side(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One key per distinct (pair, element) of this side, and the pair of each key."""
        f, o = _subset(flat, offsets, rows)
        owner = np.repeat(p, np.diff(o))
        keys, idx = _uniq_index(f ^ _mix(owner.astype(np.uint64) + salt))
        return keys, owner[idx]

    if len(pairs) >= 10_000:  # numpy releases the GIL in the sorts: the two sides side by side
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            (ka, pa_), (kb, pb_) = pool.map(side, [pairs[:, 0], pairs[:, 1]])
    else:
        (ka, pa_), (kb, pb_) = side(pairs[:, 0]), side(pairs[:, 1])
    # keys of side a also on side b (both sorted and unique): a binary search, no third sort
    if len(kb):
        pos = np.searchsorted(kb, ka)
        pos[pos == len(kb)] = 0
        in_b = kb[pos] == ka
    else:
        in_b = np.zeros(len(ka), dtype=bool)
    inter = np.bincount(pa_[in_b], minlength=len(pairs)).astype(np.float64)
    na = np.bincount(pa_, minlength=len(pairs))
    nb = np.bincount(pb_, minlength=len(pairs))
    return (inter / np.maximum(na + nb - inter, 1)).astype(np.float32)
