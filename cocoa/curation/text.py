"""Text features for curation: normalisation, pattern rules, word hashes, n-grams, repetition.

Words are ``\\w+`` runs of the lower-cased text. Each distinct word is hashed once with xxh3-64 (stable
across machines and library versions, unlike Polars' ``hash``); n-gram hashes are combined from word
hashes with wrapping uint64 arithmetic in numpy, so nothing is done per token in Python.
"""

from __future__ import annotations

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
def word_hashes(texts) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """Lower-cased ``\\w+`` words of each text as stable uint64 hashes.

    Returns ``(flat, offsets)``: row ``i``'s words are ``flat[offsets[i]:offsets[i+1]]``.
    ``texts`` is a Polars Series of strings (nulls count as empty).
    """
    import polars as pl

    words = texts.fill_null("").str.to_lowercase().str.extract_all(WORD_RE)
    lens = words.list.len().fill_null(0).to_numpy().astype(np.int64)
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    flat = words.explode().drop_nulls()  # empty lists explode to one null each
    if len(flat) == 0:
        return np.zeros(0, dtype=np.uint64), offsets
    vocab = flat.unique(maintain_order=True)
    vh = pl.Series([xxhash.xxh3_64_intdigest(w.encode()) for w in vocab.to_list()], dtype=pl.UInt64)
    hashed = flat.replace_strict(vocab, vh, return_dtype=pl.UInt64)
    return hashed.to_numpy(), offsets


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
    """
    lens = np.diff(offsets)
    if n <= 1 or len(flat) == 0:
        return flat, offsets
    size = len(flat)
    padded = np.concatenate([flat, np.zeros(n - 1, dtype=np.uint64)])
    h = padded[:size].copy()
    with np.errstate(over="ignore"):
        for j in range(1, n):
            h = (h * _P1) ^ (padded[j:j + size] * _P2) + np.uint64(j)
            h ^= h >> np.uint64(29)
    rows = row_index(offsets)
    pos = np.arange(size, dtype=np.int64) - offsets[rows]
    row_len = lens[rows]
    full = row_len >= n
    keep = full & (pos <= row_len - n)
    if short == "unigrams":
        keep |= ~full
        out = np.where(full, h, flat)[keep]
        new_lens = np.where(lens >= n, lens - n + 1, lens)
    else:
        out = h[keep]
        new_lens = np.where(lens >= n, lens - n + 1, 0)
    new_off = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(new_lens, out=new_off[1:])
    return out, new_off


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
