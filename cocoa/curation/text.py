"""Text features for curation: normalisation, pattern rules, word hashes, n-grams, repetition.

Words are ``\\w+`` runs of the lower-cased text. Each distinct word is hashed once with xxh3-64 (stable
across machines and library versions, unlike Polars' ``hash``); n-gram hashes are combined from word
hashes with wrapping uint64 arithmetic in numpy, so nothing is done per token in Python.
"""

from __future__ import annotations

import os
import re

import numpy as np
import xxhash

_P1 = np.uint64(0x9E3779B97F4A7C15)
_P2 = np.uint64(0xBF58476D1CE4E5B9)
WORD_RE = r"\w+"


def normalize_expr(col):  # type: ignore[no-untyped-def]
    """Polars expression: Unicode NFC, whitespace runs collapsed to one space, ends stripped."""
    import polars as pl

    return pl.col(col).str.normalize("NFC").str.replace_all(r"\s+", " ").str.strip_chars()


def normalize_text(s: str) -> str:
    """The same normalisation for one Python string (used for eval texts and tests)."""
    import unicodedata

    return re.sub(r"\s+", " ", unicodedata.normalize("NFC", s)).strip()


def word_count_expr(col):  # type: ignore[no-untyped-def]
    import polars as pl

    return pl.col(col).fill_null("").str.count_matches(WORD_RE).cast(pl.Int64)


def combined_pattern(patterns: list[str]) -> str | None:
    """One case-insensitive regex matching any of ``patterns`` (None when the list is empty)."""
    pats = [p for p in patterns if p]
    if not pats:
        return None
    for p in pats:
        try:
            re.compile(p)
        except re.error as e:
            from ..records import RecordError

            raise RecordError(f"curation pattern {p!r} is not a valid regex ({e}); fix it in the config") from None
    return "(?i)(?:" + "|".join(f"(?:{p})" for p in pats) + ")"


# ---------------------------------------------------------------------------------------------
# word hashes: a flat uint64 array + row offsets
# ---------------------------------------------------------------------------------------------
_BYTE_WEIGHTS = np.random.default_rng(0x5EED).integers(1, 2**63, size=64, dtype=np.int64).astype(np.uint64) | np.uint64(1)
_CHUNK_BYTES = 4 << 20
# threads hashing chunks of bytes at once in :func:`word_hashes` (at most the CPUs this process may use)
WORD_THREADS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _string_buffers(texts) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """(row byte offsets starting at 0, UTF-8 bytes) of a Polars string Series, zero-copy where possible."""
    import pyarrow as pa

    arr = texts.fill_null("").to_arrow()
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.type != pa.large_string():
        arr = arr.cast(pa.large_string())
    n = len(arr)
    bufs = arr.buffers()
    offs = np.frombuffer(bufs[1], dtype=np.int64, count=arr.offset + n + 1)[arr.offset:]
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, dtype=np.uint8)
    return offs - offs[0], data[offs[0]:offs[-1]]


def _mix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(33))) * np.uint64(0xFF51AFD7ED558CCD)
        x = (x ^ (x >> np.uint64(33))) * np.uint64(0xC4CEB9FE1A85EC53)
        return x ^ (x >> np.uint64(33))


# byte classes for the word scanner (one table lookup per byte instead of a chain of comparisons)
_IS_WORD = np.zeros(256, dtype=bool)
_IS_WORD[48:58] = _IS_WORD[65:91] = _IS_WORD[97:123] = True  # ASCII digits and letters
_IS_WORD[95] = _IS_WORD[128:] = True  # underscore, and every byte of a non-ASCII UTF-8 character
_LOWER = np.arange(256, dtype=np.uint8)
_LOWER[65:91] += 32  # ASCII case folding
_BYTE_VALUE = np.where(_IS_WORD, _LOWER.astype(np.uint64) + np.uint64(1), np.uint64(0)).astype(np.uint64)


def _words_of_bytes(offs: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n_rows = len(offs) - 1
    if len(d) == 0:
        return np.zeros(0, dtype=np.uint64), np.zeros(n_rows + 1, dtype=np.int64)
    isw = _IS_WORD[d]
    start = isw.copy()
    start[1:] &= ~isw[:-1]
    row_starts = offs[:-1][np.diff(offs) > 0]
    start[row_starts] = isw[row_starts]  # a word never continues into the next row
    S = np.flatnonzero(start)
    if len(S) == 0:
        return np.zeros(0, dtype=np.uint64), np.zeros(n_rows + 1, dtype=np.int64)
    pos = np.arange(len(d), dtype=np.int32)  # chunks are far below 2**31 bytes
    last = np.where(start, pos, np.int32(0))
    np.maximum.accumulate(last, out=last)
    pos -= last  # position in the word (garbage outside words, whose byte value is 0)
    pos &= 63
    with np.errstate(over="ignore"):
        contrib = _BYTE_WEIGHTS[pos]
        contrib *= _BYTE_VALUE[d]  # (lower-cased byte + 1) inside words, 0 outside
        h = np.add.reduceat(contrib, S)
        length = np.add.reduceat(isw.view(np.uint8), S, dtype=np.int32).astype(np.uint64)
        h = _mix64(h ^ (length * np.uint64(0x9E3779B97F4A7C15)))
    woff = np.searchsorted(S, offs, side="left").astype(np.int64)
    return h, woff


def word_hashes(texts) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """Lower-cased words of each text as stable uint64 hashes (vectorised over the UTF-8 bytes).

    A word is a run of ASCII letters/digits/underscore or non-ASCII bytes (so UTF-8 letters belong to
    words); ASCII letters are case-folded. The hash is a position-weighted sum of the word's bytes
    mixed with its length (64-bit; the same word always gets the same hash, on any machine).
    Returns ``(flat, offsets)``: row ``i``'s words are ``flat[offsets[i]:offsets[i+1]]``.
    ``texts`` is a Polars Series of strings (nulls count as empty).
    """
    offs, d = _string_buffers(texts)
    n = len(offs) - 1
    bounds = []
    r = 0
    while r < n:
        # rows [r, e) hold about _CHUNK_BYTES bytes (bounded memory)
        e = int(np.searchsorted(offs, offs[r] + _CHUNK_BYTES, side="right"))
        e = min(max(e, r + 1), n)
        bounds.append((r, e))
        r = e

    def chunk(b: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        sub = offs[b[0]:b[1] + 1]
        h, woff = _words_of_bytes(sub - sub[0], d[sub[0]:sub[-1]])
        return h, np.diff(woff)

    workers = min(WORD_THREADS, len(bounds))
    if workers > 1:  # numpy releases the GIL in these array operations: chunks run side by side
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(chunk, bounds))
    else:
        parts = [chunk(b) for b in bounds]
    offsets = np.zeros(n + 1, dtype=np.int64)
    if parts:
        np.cumsum(np.concatenate([c for _, c in parts]), out=offsets[1:])
    flat = np.concatenate([h for h, _ in parts]) if parts else np.zeros(0, dtype=np.uint64)
    return flat, offsets


def needs_normalize(texts) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Rows whose text NFC/whitespace normalisation could change: non-ASCII characters, a whitespace
    other than a single inner space (tabs, newlines, runs, leading/trailing)."""
    import polars as pl

    texts = texts.cast(pl.String).fill_null("")
    return texts.str.contains(r"[\t\n\x0b\x0c\r]|[^\x00-\x7f]|  |^ | $").to_numpy().astype(bool)


def normalize_series(texts):  # type: ignore[no-untyped-def]
    """NFC + whitespace normalisation, computed only on the rows that need it."""
    import polars as pl

    texts = texts.cast(pl.String)
    rows = np.flatnonzero(needs_normalize(texts))
    if len(rows) == 0:
        return texts
    fixed = pl.DataFrame({"t": texts.gather(rows)}).select(normalize_expr("t"))["t"]
    return texts.scatter(rows, fixed)


def hash_words(words: list[str]) -> np.ndarray:
    return np.array([xxhash.xxh3_64_intdigest(w.lower().encode()) for w in words], dtype=np.uint64)


def row_index(offsets: np.ndarray) -> np.ndarray:
    """For each flat position, the row it belongs to."""
    lens = np.diff(offsets)
    return np.repeat(np.arange(len(lens), dtype=np.int64), lens)


def ngrams(flat: np.ndarray, offsets: np.ndarray, n: int, short: str = "unigrams") -> tuple[np.ndarray, np.ndarray]:
    """Word n-gram hashes per row (flat + offsets).

    Rows with fewer than ``n`` words get their unigrams (``short="unigrams"``, for MinHash shingles)
    or nothing (``short="drop"``, for overlap tests where a short text is no evidence).
    The hashes are computed at every flat position at once (contiguous arrays, no gathers); the last
    ``n - 1`` positions of each row (which would span into the next row) are then dropped.
    """
    lens = np.diff(offsets)
    if n <= 1 or len(flat) == 0:
        return flat, offsets
    size = len(flat)
    h = flat.copy()
    with np.errstate(over="ignore"):
        for j in range(1, n):
            cut = max(size - j, 0)
            if cut:  # h[i] = (h[i] * P1) ^ (flat[i + j] * P2 + j)
                t = flat[j:] * _P2
                t += np.uint64(j)
                head = h[:cut]
                head *= _P1
                head ^= t
            h[cut:] = (h[cut:] * _P1) ^ np.uint64(j)  # past the end (always dropped): as if padded with 0
            h ^= h >> np.uint64(29)
    full = lens >= n
    keep = np.ones(size, dtype=bool)
    ends = offsets[1:][full]
    for k in range(1, n):
        keep[ends - k] = False
    short_rows = np.flatnonzero((lens > 0) & ~full)
    if len(short_rows):
        sl = lens[short_rows]
        sidx = np.repeat(offsets[:-1][short_rows] - (np.cumsum(sl) - sl), sl) + np.arange(int(sl.sum()), dtype=np.int64)
        if short == "unigrams":
            h[sidx] = flat[sidx]
        else:
            keep[sidx] = False
    new_lens = np.where(full, lens - n + 1, lens if short == "unigrams" else 0)
    new_off = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(new_lens, out=new_off[1:])
    return h[keep], new_off


def segment_max(values: np.ndarray, offsets: np.ndarray, empty: int = 0) -> np.ndarray:
    lens = np.diff(offsets)
    out = np.full(len(lens), empty, dtype=values.dtype if len(values) else np.int64)
    nz = lens > 0
    if nz.any():
        out[nz] = np.maximum.reduceat(values, offsets[:-1][nz])
    return out


def repeated_share(flat: np.ndarray, offsets: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: (share of n-grams that repeat an earlier one in the row, number of n-grams)."""
    import polars as pl

    g, goff = ngrams(flat, offsets, n, short="drop")
    counts = np.diff(goff)
    share = np.zeros(len(counts), dtype=np.float64)
    if len(g):
        df = pl.DataFrame({"r": row_index(goff), "h": g})
        agg = df.group_by("r").agg(pl.col("h").n_unique().alias("u"), pl.len().alias("n"))
        r = agg["r"].to_numpy()
        share[r] = 1.0 - agg["u"].to_numpy() / agg["n"].to_numpy()
    return share, counts


def longest_repeat(flat: np.ndarray, offsets: np.ndarray, max_period: int = 3) -> np.ndarray:
    """Per row: the most times a unit of 1..max_period words repeats back-to-back ("a b a b a b" -> 3)."""
    n_rows = len(offsets) - 1
    best = np.ones(n_rows, dtype=np.int64)
    if len(flat) == 0:
        best[np.diff(offsets) == 0] = 0
        return best
    rows = row_index(offsets)
    pos = np.arange(len(flat), dtype=np.int64) - offsets[rows]
    idx = np.arange(len(flat), dtype=np.int64)
    for d in range(1, max_period + 1):
        eq = np.zeros(len(flat), dtype=bool)
        eq[d:] = flat[d:] == flat[:-d]
        eq &= pos >= d
        last_false = np.maximum.accumulate(np.where(~eq, idx, -1))
        run = idx - last_false  # consecutive matches ending here
        reps = run // d + 1
        best = np.maximum(best, segment_max(reps, offsets, empty=1))
    best[np.diff(offsets) == 0] = 0
    return best


def overlap_share(a_words: list[str], b_words: list[str]) -> float:
    """Share of ``a``'s distinct words that occur in ``b`` (used by the answer-copies-question rule)."""
    a = {w.lower() for w in a_words}
    if not a:
        return 0.0
    b = {w.lower() for w in b_words}
    return len(a & b) / len(a)
