"""Small record builders for curation tests, examples and the benchmark (no teacher needed)."""

from __future__ import annotations

import functools
import io

import numpy as np

from ..records import ImageRef, PairRecord, SynthRecord, TeacherInfo, TemplateInfo

TEACHER = TeacherInfo(backend="fixture", model="fixture")
TEMPLATE = TemplateInfo(name="fixture", hash="0")


def noise_png(seed: int, size: tuple[int, int] = (64, 64), cells: int = 8) -> bytes:
    """A PNG of a random ``cells``x``cells`` colour grid scaled to ``size`` (distinct pHash per seed)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    a = (rng.random((cells, cells, 3)) * 255).astype("uint8")
    im = Image.fromarray(a).resize(size, Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def noise_image(seed: int, size: tuple[int, int] = (64, 64)) -> ImageRef:
    return ImageRef(bytes=noise_png(seed, size))


def caption(parent: str, text: str, image: ImageRef, source: str = "fixture") -> SynthRecord:
    return SynthRecord(parent_id=parent, source=source, image=image, kind="caption", caption=text, teacher=TEACHER,
                       template=TEMPLATE, params_hash="p", key=f"{parent}/caption/{text}")


def qa(parent: str, question: str, answer: str, image: ImageRef, source: str = "fixture") -> SynthRecord:
    return SynthRecord(parent_id=parent, source=source, image=image, kind="qa", question=question, answer=answer,
                       teacher=TEACHER, template=TEMPLATE, params_hash="p", key=f"{parent}/qa/{question}/{answer}")


def pair(source: str, qry_text: str = "", qry_image: ImageRef | None = None, pos_text: str = "",
         pos_image: ImageRef | None = None) -> PairRecord:
    return PairRecord(source=source, qry_text=qry_text, qry_image=qry_image, pos_text=pos_text, pos_image=pos_image)


_SYL = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "pe", "su", "da", "fi", "go", "hu", "ja", "be"]


def vocabulary(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct pseudo-words."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    seen = set()
    while len(out) < n:
        w = "".join(rng.choice(_SYL, size=int(rng.integers(2, 4))))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


@functools.lru_cache(maxsize=1)
def _default_vocab() -> list[str]:
    return vocabulary(2000, seed=12345)


def unique_sentence(i: int, words: int = 14, vocab: list[str] | None = None) -> str:
    """A caption-like sentence of pseudo-words, different for every ``i`` (low pairwise overlap)."""
    vocab = vocab or _default_vocab()
    rng = np.random.default_rng(10_000 + i)
    return " ".join(rng.choice(vocab, size=words)).capitalize() + "."
