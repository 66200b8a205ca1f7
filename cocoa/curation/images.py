"""Image features for curation, computed once per distinct image (by content digest), not per row.

``ImageFeatures`` holds, per distinct image: decodable or the error, width, height, and a 64-bit
perceptual hash (``imagehash.phash``). Near-duplicate images are found by pHash Hamming distance with
the pigeonhole trick: two 64-bit hashes within distance ``d`` agree exactly on at least one of ``d+1``
disjoint bit chunks, so candidates come from exact joins on chunks, then are verified.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..records import digest


@dataclass
class ImageInfo:
    ok: bool
    error: str = ""
    width: int = 0
    height: int = 0
    phash: int = 0


def image_key(ref: dict | None) -> str | None:
    """The content key of an Arrow image struct ``{"bytes", "path"}`` (None when there is no image)."""
    if ref is None:
        return None
    b = ref.get("bytes")
    if b is not None:
        return digest(b)
    p = ref.get("path")
    return None if p is None else "path:" + p


def analyse_image(data: bytes, max_pixels: int, name: str = "<image>") -> ImageInfo:
    """Decode (bomb-guarded) and hash one image."""
    import imagehash
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                # not decoded: too large is a rule, not an error; pHash stays 0 and is never compared
                return ImageInfo(ok=True, width=w, height=h, phash=0)
            im.load()
            rgb = im.convert("RGB")
    except Exception as e:  # PIL raises many types for corrupt data (and DecompressionBombError)
        msg = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the data", str(e))  # no memory addresses: stable output
        return ImageInfo(ok=False, error=f"image {name} cannot be decoded ({type(e).__name__}: {msg})")
    ph = imagehash.phash(rgb)
    bits = ph.hash.flatten()
    val = int(np.packbits(bits.astype(np.uint8)).view(">u8")[0])
    return ImageInfo(ok=True, width=w, height=h, phash=val)


def read_ref_bytes(ref: dict, root: Path | None) -> tuple[bytes | None, str]:
    """The bytes of an Arrow image struct (embedded, or a path under ``root``), or (None, error)."""
    from ..records import ImageRef, RecordError

    if ref.get("bytes") is not None:
        return ref["bytes"], ""
    try:
        return ImageRef(path=ref["path"]).read_bytes(root), ""
    except (RecordError, ValueError, OSError) as e:
        return None, str(e)


@dataclass
class ImageTable:
    """Features per distinct image key, filled incrementally (each key analysed once)."""

    max_pixels: int
    infos: dict[str, ImageInfo] = field(default_factory=dict)

    def add(self, key: str, ref: dict, root: Path | None) -> None:
        if key in self.infos:
            return
        data, err = read_ref_bytes(ref, root)
        if data is None:
            self.infos[key] = ImageInfo(ok=False, error=err)
        else:
            self.infos[key] = analyse_image(data, self.max_pixels, name=ref.get("path") or key[:16])

    def frame(self):  # type: ignore[no-untyped-def]
        import polars as pl

        keys = list(self.infos)
        inf = [self.infos[k] for k in keys]
        return pl.DataFrame(
            {
                "_img": keys,
                "img_ok": [i.ok for i in inf],
                "img_error": [i.error for i in inf],
                "img_w": [i.width for i in inf],
                "img_h": [i.height for i in inf],
                "img_phash": pl.Series([i.phash for i in inf], dtype=pl.UInt64),
            },
            schema_overrides={"img_w": pl.Int64, "img_h": pl.Int64},
        )


def _chunks(hashes: np.ndarray, distance: int) -> list[np.ndarray]:
    k = distance + 1
    bounds = np.linspace(0, 64, k + 1).astype(int)
    out = []
    for c in range(k):
        lo, hi = bounds[c], bounds[c + 1]
        mask = np.uint64(((1 << (hi - lo)) - 1) << lo)
        out.append((hashes.astype(np.uint64) & mask) >> np.uint64(lo))
    return out


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x = np.bitwise_xor(a.astype(np.uint64), b.astype(np.uint64))
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)


def phash_pairs(a: np.ndarray, b: np.ndarray | None, distance: int) -> np.ndarray:
    """Index pairs ``(i, j)`` with Hamming(a[i], b[j]) <= distance (``b=None``: pairs within ``a``, i<j)."""
    import polars as pl

    self_join = b is None
    bb = a if b is None else b
    if len(a) == 0 or len(bb) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    ca, cb = _chunks(a, distance), _chunks(bb, distance)
    found = []
    for c in range(len(ca)):
        da = pl.DataFrame({"k": ca[c], "i": np.arange(len(a), dtype=np.int64)})
        db = pl.DataFrame({"k": cb[c], "j": np.arange(len(bb), dtype=np.int64)})
        j = da.join(db, on="k")
        if self_join:
            j = j.filter(pl.col("i") < pl.col("j"))
        if j.height:
            found.append(np.stack([j["i"].to_numpy(), j["j"].to_numpy()], axis=1))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.unique(np.concatenate(found), axis=0)
    d = hamming(a[pairs[:, 0]], bb[pairs[:, 1]])
    return pairs[d <= distance]


def phash_clusters(hashes: np.ndarray, distance: int) -> np.ndarray:
    """For each hash, the index of the earliest hash in its near-duplicate component."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from .dedup import first_of_groups

    n = len(hashes)
    if n < 2:
        return np.arange(n, dtype=np.int64)
    pairs = phash_pairs(hashes, None, distance)
    if len(pairs) == 0:
        return np.arange(n, dtype=np.int64)
    g = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(g, directed=False)
    return first_of_groups(labels.astype(np.int64))
