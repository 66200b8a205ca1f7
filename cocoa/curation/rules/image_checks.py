"""Image rules: ``image_unreadable``, ``image_too_small``, ``image_too_large``, ``image_aspect`` (per row, over
the image features of :func:`cocoa.curation.frame.load_frame`) and ``image_near_dup`` (pHash clusters of the
distinct images still alive)."""

from __future__ import annotations

import numpy as np

from ..images import phash_clusters
from ..steps import Context, Step, _pl


def _img_rule(which: str):  # type: ignore[no-untyped-def]
    def rule(ctx: Context):  # type: ignore[no-untyped-def]
        pl = _pl()
        c = ctx.cfg.image
        w, h = pl.col("img_w"), pl.col("img_h")
        if which == "unreadable":
            return ~pl.col("img_ok"), pl.col("img_error")
        if which == "small":
            return pl.min_horizontal(w, h) < c.min_side, pl.format(f"image is {{}}x{{}} (min side {c.min_side})", w, h)
        if which == "large":
            return (w * h) > c.max_pixels, pl.format(f"image is {{}}x{{}} (max {c.max_pixels} pixels)", w, h)
        ratio = pl.max_horizontal(w, h) / pl.min_horizontal(w, h).clip(lower_bound=1)
        return ratio >= c.max_aspect, pl.format(f"aspect ratio {{}} (must be < {c.max_aspect})", ratio.round(1))

    return rule


def _image_near(ctx: Context, alive: np.ndarray) -> dict[int, str]:
    pl = _pl()
    sub = ctx.df[alive].select("_img", "img_phash", "parent_id").with_row_index("_j")
    imgs = sub.unique("_img", keep="first", maintain_order=True).filter(pl.col("img_phash") != 0)
    if imgs.height < 2:
        return {}
    rep = phash_clusters(imgs["img_phash"].to_numpy(), ctx.cfg.image.phash_distance)
    keys = imgs["_img"].to_list()
    parents = imgs["parent_id"].to_list()
    dropped = {keys[i]: f"image is a pHash near-duplicate of the image of {parents[r]}"
               for i, r in enumerate(rep) if r != i}
    if not dropped:
        return {}
    out = {}
    for j, k in enumerate(sub["_img"].to_list()):
        if k in dropped:
            out[int(alive[j])] = dropped[k]
    return out


CHECKS = [
    Step("image_unreadable", "the image is missing or cannot be decoded", expr=_img_rule("unreadable"),
         enabled=lambda c: c.image.enabled),
    Step("image_too_small", "shorter side below image.min_side", expr=_img_rule("small"),
         enabled=lambda c: c.image.enabled),
    Step("image_too_large", "more pixels than image.max_pixels (bomb guard)", expr=_img_rule("large"),
         enabled=lambda c: c.image.enabled),
    Step("image_aspect", "long/short side ratio at or above image.max_aspect", expr=_img_rule("aspect"),
         enabled=lambda c: c.image.enabled),
]
NEAR_DUP = Step("image_near_dup", "the image is a pHash near-duplicate of an earlier row's image", group=_image_near,
                enabled=lambda c: c.image.enabled and c.image.dedup)
