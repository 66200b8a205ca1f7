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


PLANTED_EVAL_TEXT = "a small green rubber cylinder stands behind two large metal spheres"


def planted_workspace(root, n_images: int = 80, shard_rows: int = 64):  # type: ignore[no-untyped-def]
    """A workspace (``root/shards``) whose ``synthetic/`` holds clean rows and planted ones, and an eval set
    (``root/eval``); returns ``(Workspace, eval_dir)``. Planted: exact duplicates within an image (QA) and
    across images (captions), near-duplicate captions (one word edited, chains of two edits) far apart in the
    input, a pHash near-duplicate image (re-encoded), rows contaminated by an eval image and an eval text,
    per-row failures (short, refusal, repetition, unreadable and missing images). Half the images are in the
    workspace's image store (``../images/...``), half embedded. Shards of ``shard_rows`` rows."""
    import io as _io
    from pathlib import Path

    from PIL import Image

    import pyarrow as pa

    from ..records import EvalRecord, ImageRef, schema_for, to_row
    from ..shards import ImageStore, ShardWriter, Workspace, write_records

    root = Path(root)
    ws = Workspace(root / "shards")
    ws.root.mkdir(parents=True, exist_ok=True)
    store = ImageStore(ws.root)
    imgs = [store.put(noise_png(i)) if i % 2 else noise_image(i) for i in range(n_images)]
    recs: list[SynthRecord] = []
    for i in range(n_images):
        p = f"p{i}"
        recs.append(caption(p, unique_sentence(i, 20), imgs[i]))
        recs.append(qa(p, f"What is left of object {i}?", f"A cube number {i}.", imgs[i]))
        recs.append(qa(p, "How many spheres are there?", "Two.", imgs[i]))  # repeats across images: kept
    late = []
    for i in range(0, n_images, 9):  # exact duplicates: the same caption for another image, the same QA again
        late.append(caption(f"x{i}", unique_sentence(i, 20), imgs[(i + 1) % n_images]))
        late.append(qa(f"p{i}", f"What is left of object {i}?", f"A cube number {i}.", imgs[i])
                    .model_copy(update={"id": f"dup-{i}"}))
    for i in range(3, n_images, 7):  # near duplicates: one word edited, and a second edit of the edit (a chain)
        w = unique_sentence(i, 20).rstrip(".").split()
        w[10] = "zzedit"
        late.append(caption(f"n{i}", " ".join(w) + ".", imgs[(i + 5) % n_images]))
        w[4] = "yyedit"
        late.append(caption(f"m{i}", " ".join(w) + ".", imgs[(i + 6) % n_images]))
    buf = _io.BytesIO()
    Image.open(_io.BytesIO(noise_png(5))).save(buf, format="JPEG", quality=95)
    late.append(caption("jpeg5", unique_sentence(5000, 16), ImageRef(bytes=buf.getvalue())))  # pHash near-dup
    late.append(caption("leak-img", unique_sentence(5001, 16), ImageRef(bytes=noise_png(777))))
    late.append(caption("leak-txt", "In the corner " + PLANTED_EVAL_TEXT + " under a bright light.", imgs[2]))
    late.append(caption("short", "A red cube.", imgs[3]))
    late.append(caption("refusal", "I'm sorry, I cannot see the image clearly enough to describe it.", imgs[4]))
    late.append(caption("rep", "the tower is very very very very tall and grey under the cloudy sky", imgs[6]))
    late.append(caption("bad", unique_sentence(5002, 16), ImageRef(bytes=b"not an image")))
    late.append(caption("missing", unique_sentence(5003, 16), ImageRef(path="images/missing.png")))
    late.append(caption("small", unique_sentence(5004, 16), noise_image(5004, (20, 64))))
    # interleave: planted rows land in other shards and blocks than the rows they repeat
    out = []
    step = max(1, len(recs) // max(1, len(late)))
    for j, r in enumerate(late):
        out.extend(recs[j * step:(j + 1) * step])
        out.append(r)
    out.extend(recs[len(late) * step:])
    # rows that fit the Arrow schema but are not valid SynthRecords (invalid_record), written without validation
    rows = [to_row(r) for r in out]
    good = to_row(caption("inv", unique_sentence(5005, 16), imgs[7]))
    for j, (k, v) in enumerate([("kind", "summary"), ("meta", "{not json"), ("meta", "[1, 2]"),
                                ("image", {"bytes": None, "path": "../../etc/passwd"})]):
        rows.insert(37 * (j + 1), {**good, k: v, "id": f"invalid-{j}", "key": f"invalid/{j}"})
    with ShardWriter(ws.synthetic, "SynthRecord", max_rows=shard_rows) as w:
        w.write_table(pa.Table.from_pylist(rows, schema=schema_for("SynthRecord")))
    write_records(ws.original, "PairRecord", [
        pair("toy", qry_image=ImageRef(bytes=noise_png(777)), pos_text="a photo"),
        pair("toy", qry_text="find: " + PLANTED_EVAL_TEXT, pos_image=noise_image(5)),
        pair("toy", qry_image=noise_image(6), pos_text="a clean pair"),
    ])
    ev = root / "eval" / "toy_retrieval"
    (ev / "images").mkdir(parents=True, exist_ok=True)
    (ev / "images" / "e0.png").write_bytes(noise_png(777))
    write_records(ev, "EvalRecord", [
        EvalRecord(dataset="toy_retrieval", meta_task="retrieval", split="IND", qry_image=ImageRef(path="images/e0.png"),
                   tgt_texts=[PLANTED_EVAL_TEXT, "red cube"], tgt_images=[None, None]),
        EvalRecord(dataset="toy_retrieval", meta_task="retrieval", split="IND", qry_text="green rubber cylinder",
                   tgt_texts=["x"], tgt_images=[noise_image(888)]),
    ])
    return ws, root / "eval"
