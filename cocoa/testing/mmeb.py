"""Small MMEB-train / MMEB-eval copies in exactly the published layout (parquet + zips), for tests
and examples. Images are real JPEGs rendered with Pillow (procedural scenes), texts are MMEB-style.

    write_mmeb_train_fixture(dir)   dir/<Subset>/{original,diverse_instruction}-00000-of-00001.parquet
                                    dir/images_zip/<Subset>.zip   (members images/<Subset>/Train/...)
    write_mmeb_eval_fixture(dir)    dir/<Dataset>/test-00000-of-00001.parquet
                                    dir/images.zip                (members <Dataset>/...)

``extra_rows`` / ``extra_members`` inject rows and zip members (e.g. broken ones) for tests.
"""

from __future__ import annotations

import io
import random
import zipfile
from pathlib import Path
from typing import Any

from ..sources.scenes import Scene, crop_object, render_scene, sample_scene

IMG = "<|image_1|>"
DEFAULT_TRAIN_SUBSETS = ("ImageNet_1K", "OK-VQA", "MSCOCO_t2i", "MSCOCO")
DEFAULT_EVAL_DATASETS = ("ImageNet-1K", "OK-VQA", "MSCOCO_t2i", "RefCOCO")


def _jpeg(image, quality: int = 90) -> bytes:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_parquet(path: str | Path, rows: list[dict[str, Any]], schema=None) -> Path:  # type: ignore[no-untyped-def]
    """Write rows as one parquet file (string columns; list columns for MMEB-eval targets)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def write_zip(path: str | Path, members: dict[str, bytes]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in members.items():  # fixed timestamps: the same fixture is byte-identical
            z.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0)), data)
    return path


def _scene(rng: random.Random, **kw: Any) -> Scene:
    return sample_scene(rng, forbid=frozenset(), **kw)


def _train_rows(subset: str, n: int, rng: random.Random, size: int, members: dict[str, bytes],
                instruction_variant: bool) -> list[dict[str, Any]]:
    rows = []
    prefix = f"images/{subset}/Train"
    for i in range(n):
        sc = _scene(rng, main_large=subset == "ImageNet_1K")
        img = render_scene(sc, size)
        qpath = f"{prefix}/{subset}_image_{i}.jpg"
        main = sc.objects[0]
        if subset == "ImageNet_1K":
            inst = "Represent the given image for classification" if not instruction_variant else \
                "Identify the category of the main object in this image"
            row = {"qry": f"{IMG}\n{inst}\n", "qry_image_path": qpath, "pos_text": main.label, "pos_image_path": ""}
            members[qpath] = _jpeg(img)
        elif subset == "OK-VQA":
            q = "How many objects are there?" if i % 2 == 0 else f"What color is the {main.shape}?"
            a = str(len(sc.objects)) if i % 2 == 0 else main.color
            row = {"qry": f"{IMG}\nRepresent the given image with the following question: {q}\n", "qry_image_path": qpath,
                   "pos_text": a, "pos_image_path": "", "neg_text": "7" if a != "7" else "3", "neg_image_path": ""}
            members[qpath] = _jpeg(img)
        elif subset == "MSCOCO_t2i":
            cap = sc.coarse_caption("a photo with {x}")
            row = {"qry": f"Find me an everyday image that matches the given caption: {cap}\n", "qry_image_path": "",
                   "pos_text": f"{IMG}\nRepresent the given image.\n", "pos_image_path": qpath}
            members[qpath] = _jpeg(img)
        elif subset == "MSCOCO":
            crop_path = f"{prefix}/{i}_object_{main.label}.jpg"
            row = {"qry": f'{IMG}\nSelect the portion of the image that isolates the object labeled as "{main.label}"\n',
                   "qry_image_path": qpath, "pos_text": f"{IMG}\nRepresent the given cropped image of the object\n",
                   "pos_image_path": crop_path}
            members[qpath] = _jpeg(img)
            members[crop_path] = _jpeg(crop_object(img, sc, 0))
        else:  # generic: image -> label
            row = {"qry": f"{IMG}\nRepresent the given image.\n", "qry_image_path": qpath, "pos_text": main.label,
                   "pos_image_path": ""}
            members[qpath] = _jpeg(img)
        rows.append(row)
    return rows


def write_mmeb_train_fixture(
    root: str | Path, subsets: tuple[str, ...] | list[str] = DEFAULT_TRAIN_SUBSETS, n_per_subset: int = 4, *,
    splits: tuple[str, ...] = ("original", "diverse_instruction"), seed: int = 0, image_size: int = 112,
    extra_rows: dict[str, list[dict[str, Any]]] | None = None, extra_members: dict[str, dict[str, bytes]] | None = None,
) -> Path:
    """A small MMEB-train snapshot under ``root``; returns ``root``."""
    root = Path(root)
    for subset in subsets:
        members: dict[str, bytes] = {}
        for split in splits:
            rows = _train_rows(subset, n_per_subset, random.Random(f"{seed}:{subset}"), image_size, members,
                               instruction_variant=split == "diverse_instruction")
            if split == splits[0]:
                rows += (extra_rows or {}).get(subset, [])
            write_parquet(root / subset / f"{split}-00000-of-00001.parquet", rows)
        members.update((extra_members or {}).get(subset, {}))
        write_zip(root / "images_zip" / f"{subset}.zip", members)
    return root


def _eval_rows(name: str, meta_task: str, n: int, n_cand: int, rng: random.Random, size: int,
               members: dict[str, bytes]) -> list[dict[str, Any]]:
    from ..sources.scenes import ALL_LABELS

    rows = []
    pool = [_scene(rng) for _ in range(n + n_cand)]
    for i in range(n):
        sc = pool[i]
        img = render_scene(sc, size)
        qpath = f"{name}/{name}_{i}.jpg"
        main = sc.objects[0]
        if meta_task == "classification":
            labels = [main.label] + [lab for lab in ALL_LABELS if lab != main.label][: n_cand - 1]
            members[qpath] = _jpeg(img)
            rows.append({"qry_text": f"{IMG} Represent the given image for classification", "qry_img_path": qpath,
                         "tgt_text": labels, "tgt_img_path": [""] * len(labels)})
        elif meta_task == "vqa":
            ans = str(len(sc.objects))
            cands = [ans] + [str(k) for k in range(10) if str(k) != ans][: n_cand - 1]
            members[qpath] = _jpeg(img)
            rows.append({"qry_text": f"{IMG} Represent the given image with the following question: How many objects are there?",
                         "qry_img_path": qpath, "tgt_text": cands, "tgt_img_path": [""] * len(cands)})
        elif meta_task == "retrieval" and name.endswith("_i2t"):
            caps = [sc.coarse_caption()] + [pool[n + k].coarse_caption() for k in range(n_cand - 1)]
            members[qpath] = _jpeg(img)
            rows.append({"qry_text": f"{IMG} Find an image caption describing the given everyday image.",
                         "qry_img_path": qpath, "tgt_text": caps, "tgt_img_path": [""] * len(caps)})
        elif meta_task == "retrieval":  # text -> image: candidates are shared images (as in MMEB)
            paths = [qpath] + [f"{name}/{name}_cand_{k}.jpg" for k in range(n_cand - 1)]
            members[qpath] = _jpeg(img)
            for k in range(n_cand - 1):
                members.setdefault(paths[k + 1], _jpeg(render_scene(pool[n + k], size)))
            rows.append({"qry_text": f"Find me an everyday image that matches the given caption: {sc.coarse_caption()}",
                         "qry_img_path": "", "tgt_text": [f"{IMG} Represent the given image."] * len(paths),
                         "tgt_img_path": paths})
        else:  # grounding: query image + expression -> crop of the object among crops
            members[qpath] = _jpeg(img)
            paths = []
            for k in range(n_cand):
                src, j = (sc, 0) if k == 0 else (pool[n + k - 1], 0)
                cp = f"{name}/{name}_{i}_crop_{k}.jpg"
                members[cp] = _jpeg(crop_object(render_scene(src, size) if k else img, src, j))
                paths.append(cp)
            rows.append({"qry_text": f"{IMG} Select the portion of the image that follows the language expressions: {main.label}",
                         "qry_img_path": qpath, "tgt_text": [f"{IMG} Represent the given cropped image of the object"] * n_cand,
                         "tgt_img_path": paths})
    return rows


def write_mmeb_eval_fixture(
    root: str | Path, datasets: tuple[str, ...] | list[str] = DEFAULT_EVAL_DATASETS, n_per_dataset: int = 4,
    n_candidates: int = 6, *, seed: int = 0, image_size: int = 112,
    extra_rows: dict[str, list[dict[str, Any]]] | None = None, extra_members: dict[str, bytes] | None = None,
) -> Path:
    """A small MMEB-eval snapshot under ``root`` for the given MMEB-V1 dataset names; returns ``root``."""
    import pyarrow as pa

    from ..sources.mmeb import mmeb_v1_by_name

    table = mmeb_v1_by_name()
    unknown = [d for d in datasets if d not in table]
    if unknown:
        from ..sources.mmeb import MMEBError

        raise MMEBError(f"unknown MMEB-V1 dataset(s) {unknown}; known: {', '.join(table)}")
    root = Path(root)
    schema = pa.schema([("qry_text", pa.string()), ("qry_img_path", pa.string()),
                        ("tgt_text", pa.list_(pa.string())), ("tgt_img_path", pa.list_(pa.string()))])
    members: dict[str, bytes] = {}
    for name in datasets:
        rows = _eval_rows(name, table[name].meta_task, n_per_dataset, n_candidates, random.Random(f"{seed}:{name}"),
                          image_size, members)
        rows += (extra_rows or {}).get(name, [])
        write_parquet(root / name / "test-00000-of-00001.parquet", rows, schema=schema)
    members.update(extra_members or {})
    write_zip(root / "images.zip", members)
    return root
