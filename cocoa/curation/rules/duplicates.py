"""Duplicate rules: ``exact_dup_image`` and ``exact_dup_global`` (the xxh3 digest of the lower-cased text,
``_tdig``) and ``near_dup`` (MinHash LSH over the word hashes), each over the rows still alive."""

from __future__ import annotations

import numpy as np

from ..dedup import _subset, first_of_groups_cols, near_duplicates
from ..steps import Context, Step


def _exact_image(ctx: Context, alive: np.ndarray) -> dict[int, str]:
    df = ctx.df.select("_img_id", "kind", "_tdig", "id")[alive]
    first = first_of_groups_cols(df["_img_id"].to_numpy(), (df["kind"] == "qa").to_numpy(), df["_tdig"].to_numpy())
    dup = np.flatnonzero(first != np.arange(len(first)))
    ids = df["id"].gather(first[dup]).to_list()
    return {int(alive[j]): f"same text as {i} for the same image" for j, i in zip(dup, ids)}


def _exact_global(ctx: Context, alive: np.ndarray) -> dict[int, str]:
    kind_col = ctx.df["kind"].to_numpy()
    sel = alive[np.isin(kind_col[alive], list(set(ctx.cfg.exact.global_kinds)))]
    if len(sel) < 2:
        return {}
    df = ctx.df.select("kind", "_tdig", "id", "parent_id")[sel]
    first = first_of_groups_cols((df["kind"] == "qa").to_numpy(), df["_tdig"].to_numpy())
    dup = np.flatnonzero(first != np.arange(len(first)))
    ids = df["id"].gather(first[dup]).to_list()
    par = df["parent_id"].gather(first[dup]).to_list()
    return {int(sel[j]): f"same text as {i} (image of {p})" for j, i, p in zip(dup, ids, par)}


def _near(ctx: Context, alive: np.ndarray) -> dict[int, str]:
    c = ctx.cfg.near
    kind_col = ctx.df["kind"].to_numpy()
    sel = alive[np.isin(kind_col[alive], list(c.kinds))]
    if len(sel) < 2:
        return {}
    flat, off = _subset(*ctx.words, sel)  # type: ignore[misc]
    res = near_duplicates(flat, off, shingle=c.shingle, num_perm=c.num_perm, bands=c.bands, threshold=c.threshold,
                          seed=c.seed, max_bucket_pairs=c.max_bucket_pairs)
    ctx.stats["near"] = {"candidates": res.candidates, "pairs_checked": res.pairs_checked,
                         "pairs_linked": res.pairs_linked}
    ids = ctx.df["id"].to_list()
    out = {}
    for j in np.flatnonzero(res.rep != np.arange(len(sel))):
        keep = int(sel[res.rep[j]])
        out[int(sel[j])] = f"near-duplicate of {ids[keep]} (shingle Jaccard {res.similarity[j]:.2f} with a row of its cluster)"
    return out


STEPS = [
    Step("exact_dup_image", "same text as an earlier row for the same image", group=_exact_image,
         enabled=lambda c: c.exact.enabled),
    Step("exact_dup_global", "same text as an earlier row (any image; exact.global_kinds)", group=_exact_global,
         enabled=lambda c: c.exact.enabled),
    Step("near_dup", "MinHash near-duplicate of an earlier row (near.kinds)", group=_near,
         enabled=lambda c: c.near.enabled),
]
