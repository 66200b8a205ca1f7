"""Image features for curation, computed once per distinct image (by content digest), not per row.

``ImageFeatures`` holds, per distinct image: decodable or the error, width, height, and a 64-bit
perceptual hash (``imagehash.phash``). Near-duplicate images are found by pHash Hamming distance with
the pigeonhole trick: two 64-bit hashes within distance ``d`` agree exactly on at least one of ``d+1``
disjoint bit chunks, so candidates come from exact joins on chunks, then are verified.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..records import digest
from ..errors import CocoaError


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


_N = 32  # imagehash.phash: hash_size 8 x highfreq_factor 4
_DCT8 = 2.0 * np.cos(np.pi * np.arange(8)[:, None] * (2 * np.arange(_N) + 1) / (2 * _N))  # rows 0..7 of DCT-II


def _prepare(data: bytes, max_pixels: int, name: str) -> tuple[ImageInfo, np.ndarray | None]:
    """Decode one image (bomb-guarded) to imagehash's 32x32 grayscale input."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                # not decoded: too large is a rule, not an error; pHash stays 0 and is never compared
                return ImageInfo(ok=True, width=w, height=h, phash=0), None
            im.draft("L", (2 * _N, 2 * _N))  # JPEG: decode at a reduced scale (no effect on PNG)
            small = im.convert("L").resize((_N, _N), Image.Resampling.LANCZOS)
            return ImageInfo(ok=True, width=w, height=h), np.asarray(small, dtype=np.float64)
    except Image.DecompressionBombError:  # PIL refuses to open it at all: measure it without decoding
        size = _size_only(data)
        if size is not None:
            return ImageInfo(ok=True, width=size[0], height=size[1], phash=0), None
        return ImageInfo(ok=False, error=f"image {name} cannot be decoded (a decompression bomb of unknown size)"), None
    except Exception as e:  # PIL raises many types for corrupt data (and DecompressionBombError)
        msg = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the data", str(e))  # no memory addresses: stable output
        return ImageInfo(ok=False, error=f"image {name} cannot be decoded ({type(e).__name__}: {msg})"), None


def _size_only(data: bytes) -> tuple[int, int] | None:
    """(width, height) of an image PIL refuses to open as a decompression bomb; nothing is decoded."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # only the header is read; the caller never decodes it
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:  # corrupt beyond its header
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def phash_batch(pixels: np.ndarray) -> np.ndarray:
    """imagehash.phash of many 32x32 grayscale arrays at once -> uint64 (bit i = hash.flatten()[i], MSB first)."""
    if len(pixels) == 0:
        return np.zeros(0, dtype=np.uint64)
    low = np.einsum("ij,njk,lk->nil", _DCT8, pixels, _DCT8)  # DCT-II along both axes, 8x8 low frequencies
    flat = low.reshape(len(pixels), 64)
    bits = flat > np.median(flat, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8")[:, 0].astype(np.uint64)


def analyse_images(items: list[tuple[bytes, str]], max_pixels: int) -> list[ImageInfo]:
    """Decode, measure and pHash images (the pHash is computed for the whole batch in numpy)."""
    infos, pix, where = [], [], []
    for data, name in items:
        info, arr = _prepare(data, max_pixels, name)
        infos.append(info)
        if arr is not None:
            pix.append(arr)
            where.append(len(infos) - 1)
    if pix:
        for i, h in zip(where, phash_batch(np.stack(pix)).tolist()):
            infos[i].phash = h if h else 1  # 0 means "no hash"; an all-zero pHash is practically impossible
    return infos


def analyse_image(data: bytes, max_pixels: int, name: str = "<image>") -> ImageInfo:
    """Decode (bomb-guarded) and pHash one image."""
    return analyse_images([(data, name)], max_pixels)[0]


def read_ref_bytes(ref: dict, root: Path | None) -> tuple[bytes | None, str]:
    """The bytes of an Arrow image struct (embedded, or a path under ``root``), or (None, error)."""
    from ..records import ImageRef

    if ref.get("bytes") is not None:
        return ref["bytes"], ""
    try:
        return ImageRef(path=ref["path"]).read_bytes(root), ""
    except (CocoaError, ValueError, OSError) as e:
        return None, str(e)


class ImageTable:
    """Features per distinct image key; each key is analysed once, in batches (in worker processes when
    there are many images and more than one CPU)."""

    def __init__(self, max_pixels: int, workers: int | None = None, batch: int = 256) -> None:
        self.max_pixels = max_pixels
        self.infos: dict[str, ImageInfo] = {}
        self.batch = batch
        self.workers = workers if workers is not None else min(4, len(os.sched_getaffinity(0)))
        self._pending: list[tuple[str, bytes, str]] = []
        self._futures: list = []
        self._pool = None
        self.seen = 0

    def add(self, key: str, ref: dict, root: Path | None) -> None:
        if key in self.infos:
            return
        data, err = read_ref_bytes(ref, root)
        if data is None:
            self.infos[key] = ImageInfo(ok=False, error=err)
            return
        self.infos[key] = ImageInfo(ok=True)  # placeholder, filled when its batch is analysed
        self._pending.append((key, data, ref.get("path") or key[:16]))
        if len(self._pending) >= self.batch:
            self._submit()

    def _submit(self) -> None:
        items, self._pending = self._pending, []
        if not items:
            return
        keys = [k for k, _, _ in items]
        work = [(d, n) for _, d, n in items]
        self.seen += len(items)
        if self.workers > 1 and self.seen > 4 * self.batch:
            if self._pool is None:
                import multiprocessing as mp
                from concurrent.futures import ProcessPoolExecutor

                self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("forkserver"))
            self._futures.append((keys, self._pool.submit(analyse_images, work, self.max_pixels)))
            while len(self._futures) > 2 * self.workers:
                self._collect_one()
        else:
            for k, info in zip(keys, analyse_images(work, self.max_pixels)):
                self.infos[k] = info

    def _collect_one(self) -> None:
        keys, fut = self._futures.pop(0)
        for k, info in zip(keys, fut.result()):
            self.infos[k] = info

    def finish(self) -> None:
        self._submit()
        while self._futures:
            self._collect_one()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def frame(self):  # type: ignore[no-untyped-def]
        import polars as pl

        self.finish()
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
