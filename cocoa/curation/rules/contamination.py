"""Decontamination against evaluation data: rules ``decontam_image`` and ``decontam_text`` over the synthetic
rows still alive, and :func:`decontaminate_original` for the original PairRecords (rejected rows with
``meta.input = "original"``, which ``mix`` leaves out). The eval index and matching: :mod:`cocoa.curation.decontam`."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...records import from_row, payload_json
from ...shards import Workspace
from ..config import CurationConfig
from ..decontam import image_matches, text_matches
from ..dedup import _subset
from ..images import analyse_image, image_key, read_ref_bytes
from ..inputs import open_checked, pa_indices
from ..rejected import _quarantine_row
from ..steps import Context, Step
from ..text import word_hashes


def _decontam_image(ctx: Context, alive: np.ndarray) -> dict[int, str]:
    sub = ctx.df[alive].select("_img", "img_phash")
    imgs = sub.unique("_img", keep="first", maintain_order=True)
    hits = image_matches(ctx.eval_index, imgs["img_phash"].to_numpy(), ctx.cfg.decontam.image_distance)
    if not hits:
        return {}
    bad = {imgs["_img"][i]: lab for i, lab in hits.items()}
    out = {}
    for j, k in enumerate(sub["_img"].to_list()):
        if k in bad:
            out[int(alive[j])] = f"image matches eval image of {bad[k]}"
    return out


def _decontam_text(ctx: Context, alive: np.ndarray) -> dict[int, str]:
    c = ctx.cfg.decontam
    flat, off = _subset(*ctx.words, alive)  # type: ignore[misc]
    hits = text_matches(ctx.eval_index, flat, off, c.ngram, c.threshold)
    return {int(alive[j]): f"text covers {s:.2f} of the {c.ngram}-grams of eval text {lab}" for j, (lab, s) in hits.items()}


def decontaminate_original(ws: Workspace, cfg: CurationConfig, eval_index: Any, max_pixels: int,
                           progress: Any = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Contaminated original PairRecords -> quarantine rows (``meta.input = "original"``)."""
    if not ws.original.exists():
        return [], {"rows": 0, "note": f"{ws.original} does not exist: nothing to decontaminate"}
    ds = open_checked(ws.original, "PairRecord", "original data")
    n = len(ds)
    hits: dict[int, tuple[str, str]] = {}
    c = cfg.decontam
    if c.text and n:
        df = ds.scan().select("qry_text", "pos_text", "neg_text").collect()
        for col in ("qry_text", "pos_text", "neg_text"):
            f, o = word_hashes(df[col].fill_null(""))
            for r, (lab, s) in text_matches(eval_index, f, o, c.ngram, c.threshold).items():
                hits.setdefault(r, ("decontam_text", f"{col} covers {s:.2f} of the {c.ngram}-grams of eval text {lab}"))
    if c.image and n and len(eval_index.image_hashes):
        phash: dict[str, int] = {}
        row_keys: list[list[str]] = []
        task = progress.add_task("original images", total=n) if progress else None
        for _, _, batch in ds.iter_batches(columns=["qry_image", "pos_image", "neg_image"]):
            cols = [batch.column(i).to_pylist() for i in range(3)]
            for refs in zip(*cols):
                ks = []
                for ref in refs:
                    k = image_key(ref)
                    if k is None:
                        continue
                    if k not in phash:
                        data, _err = read_ref_bytes(ref, ds.path)
                        phash[k] = analyse_image(data, max_pixels).phash if data is not None else 0
                    ks.append(k)
                row_keys.append(ks)
            if progress:
                progress.advance(task, batch.num_rows)
        keys = list(phash)
        m = image_matches(eval_index, np.array([phash[k] for k in keys], dtype=np.uint64), c.image_distance)
        bad = {keys[i]: lab for i, lab in m.items()}
        for r, ks in enumerate(row_keys):
            for k in ks:
                if k in bad and r not in hits:
                    hits[r] = ("decontam_image", f"image matches eval image of {bad[k]}")
    rows_out: list[dict[str, Any]] = []
    by_rule: dict[str, int] = {}
    if hits:
        wanted = sorted(hits)
        t = ds.table().take(pa_indices(wanted))
        for r, row in zip(wanted, t.to_pylist()):
            rec = from_row("PairRecord", row, where=f"{ds.path} row {r}")
            reason, detail = hits[r]
            by_rule[reason] = by_rule.get(reason, 0) + 1
            rows_out.append(_quarantine_row(reason, detail, {"id": rec.id}, payload_json(rec),
                                            {"input": "original", "source": rec.source}))
    return rows_out, {"rows": n, "rejected": len(rows_out), "by_rule": by_rule}


STEPS = [
    Step("decontam_image", "the image matches an evaluation image", group=_decontam_image,
         enabled=lambda c: c.decontam.image),
    Step("decontam_text", "the text overlaps an evaluation query/target", group=_decontam_text,
         enabled=lambda c: c.decontam.text),
]
