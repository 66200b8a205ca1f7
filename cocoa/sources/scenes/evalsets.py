"""The evaluation sets with MMEB's protocol: candidate 0 is the positive, then hard distractors (the
same scene with one attribute changed, other objects of the same scene, answers of the same type), then
distractors from a pool of scenes of the split's distribution."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from ...records import EvalRecord, ImageRef, digest
from .graph import Scene, keyed_rng, sample_scene
from .render import crop_object, crop_size_for, png_bytes, render_scene
from .tasks import make_item, TaskItem
from .vocab import (ALL_LABELS, ANSWERS_BY_TYPE, CAPTION_TEMPLATES, COLOR_NAMES, DATASETS, HELD_OUT_COMBOS,
                    MATERIALS, MAX_OBJECTS, SHAPES, SIZES, TARGET_CROP_TEXT, TARGET_IMAGE_TEXT, dataset_names)

ImageStore = Callable[[str, bytes], ImageRef]


def _embed_store(dataset: str, data: bytes) -> ImageRef:
    return ImageRef(bytes=data)


def _mutate(scene: Scene, rng: random.Random, forbid: frozenset[tuple[str, str]]) -> Scene | None:
    """A hard negative: the same scene with one object's colour or shape changed, or one object
    removed/added, such that its coarse caption differs."""
    objs = list(scene.objects)
    kind = rng.choice(["color", "shape", "color", "shape", "drop", "add"])
    if kind == "drop" and len(objs) > 1:
        objs.pop(rng.randrange(len(objs)))
    elif kind == "add" and len(objs) < MAX_OBJECTS:
        extra = sample_scene(rng, n_objects=1, forbid=forbid).objects[0]
        objs.append(extra)
    else:
        k = rng.randrange(len(objs))
        o = objs[k]
        if kind == "color" or kind in ("drop", "add"):
            new = replace(o, color=rng.choice([c for c in COLOR_NAMES if c != o.color]))
        else:
            new = replace(o, shape=rng.choice([s for s in SHAPES if s != o.shape]))
        if new.shape == "ring":
            new = replace(new, text=None)
        objs[k] = new
    if any((o.color, o.shape) in forbid for o in objs):
        return None
    m = Scene(objects=tuple(objs), seed=scene.seed + ":mut")
    return None if m.caption_key() == scene.caption_key() else m


class _EvalBuilder:
    def __init__(self, name: str, n_queries: int, n_distractors: int, seed: int, image_size: int,
                 store: ImageStore, n_hard: int) -> None:
        self.name = name
        self.info = DATASETS[name]
        self.task, self.split = self.info["task"], self.info["split"]
        self.n_queries, self.n_distractors = n_queries, n_distractors
        self.seed, self.image_size, self.store, self.n_hard = seed, image_size, store, n_hard
        self.forbid = HELD_OUT_COMBOS if self.split == "IND" else frozenset()
        self._refs: dict[Scene, ImageRef] = {}  # scenes are frozen (hashable): each rendered once

    def image(self, scene: Scene, need_pixels: bool = False):  # type: ignore[no-untyped-def]
        """(PIL image or None, ImageRef) for ``scene``; pool scenes recur across queries."""
        ref = self._refs.get(scene)
        if ref is not None and not need_pixels:
            return None, ref
        img = render_scene(scene, self.image_size)
        if ref is None:
            ref = self._refs[scene] = self.store(self.name, png_bytes(img))
        return img, ref

    def ref(self, img) -> ImageRef:  # type: ignore[no-untyped-def]
        return self.store(self.name, png_bytes(img))

    def _pool_size(self) -> int:
        # 1.5x: pool scenes whose caption equals the query's (common among 1-object scenes) are unusable;
        # only scenes actually drawn as candidates are rendered
        return self.n_distractors * 3 // 2 + 16

    def pool_scenes(self, n: int) -> list[Scene]:
        rng = keyed_rng("scenes-pool", self.seed, self.name)
        # pool scenes follow the split's distribution (OOD pools may contain held-out combos)
        out = []
        for k in range(n):
            main = None
            if self.split == "OOD" and rng.random() < 0.5:
                c, s = rng.choice(sorted(HELD_OUT_COMBOS))
                main = {"color": c, "shape": s}
            out.append(sample_scene(rng, forbid=self.forbid, main=main, seed=f"{self.seed}:{self.name}:pool:{k}"))
        return out

    def records(self) -> Iterator[EvalRecord]:
        t = self.task
        if t == "classification":
            yield from self._cls()
        elif t == "vqa":
            yield from self._vqa()
        elif t == "retrieval_t2i":
            yield from self._t2i()
        elif t == "retrieval_i2t":
            yield from self._i2t()
        else:
            yield from self._ground()

    def _items(self) -> Iterator[tuple[int, random.Random, TaskItem]]:
        for q in range(self.n_queries):
            rng = keyed_rng("scenes-eval", self.seed, self.name, q)
            yield q, rng, make_item(self.task, rng, self.split, seed=f"{self.seed}:{self.name}:{q}")

    def _rec(self, item: TaskItem, q: int, qry_image: ImageRef | None, texts: list[str],
             images: list[ImageRef | None], **meta: Any) -> EvalRecord:
        m = item.annotate({"task": item.task, "scene": item.scene.to_dict(), "index": q, "n_candidates": len(texts),
                           **meta})
        return EvalRecord(dataset=self.name, meta_task=self.info["meta_task"], split=self.split,  # type: ignore[arg-type]
                          qry_text=item.qry_text, qry_image=qry_image, tgt_texts=texts, tgt_images=images, meta=m)

    def _cls(self) -> Iterator[EvalRecord]:
        for q, rng, item in self._items():
            others = [lab for lab in ALL_LABELS if lab != item.pos_text]
            rng.shuffle(others)
            texts = [item.pos_text] + others
            yield self._rec(item, q, self.image(item.scene)[1], texts, [None] * len(texts))

    def _vqa(self) -> Iterator[EvalRecord]:
        for q, rng, item in self._items():
            same = [a for a in ANSWERS_BY_TYPE[item.answer_type] if a != item.pos_text]  # type: ignore[index]
            rng.shuffle(same)
            rest = [a for k, v in ANSWERS_BY_TYPE.items() if k != item.answer_type for a in v]
            rest += [o for o in (f"{z} {m} {c} {s}" for z in SIZES for m in MATERIALS for c in COLOR_NAMES for s in SHAPES)]
            rest = [a for a in dict.fromkeys(rest) if a != item.pos_text and a not in same]
            rng.shuffle(rest)
            texts = [item.pos_text] + (same + rest)[: self.n_distractors]
            yield self._rec(item, q, self.image(item.scene)[1], texts, [None] * len(texts),
                            distractors_capped=len(texts) - 1 < self.n_distractors)

    def _hard_scenes(self, scene: Scene, rng: random.Random) -> list[Scene]:
        out: list[Scene] = []
        keys = {scene.caption_key()}
        for _ in range(self.n_hard * 4):
            if len(out) >= min(self.n_hard, self.n_distractors):
                break
            m = _mutate(scene, rng, self.forbid)
            if m is not None and m.caption_key() not in keys:
                keys.add(m.caption_key())
                out.append(m)
        return out

    def _pool_fill(self, pool: list[Scene], rng: random.Random, taken: set[frozenset[str]], k: int) -> list[Scene]:
        order = list(range(len(pool)))
        rng.shuffle(order)
        out = []
        for j in order:
            if len(out) >= k:
                break
            key = pool[j].caption_key()
            if key not in taken:
                taken.add(key)
                out.append(pool[j])
        return out

    def _t2i(self) -> Iterator[EvalRecord]:
        pool = self.pool_scenes(self._pool_size())
        for q, rng, item in self._items():
            hard = self._hard_scenes(item.scene, rng)
            taken = {item.scene.caption_key()} | {h.caption_key() for h in hard}
            easy = self._pool_fill(pool, rng, taken, self.n_distractors - len(hard))
            scenes = [item.scene] + hard + easy
            images: list[ImageRef | None] = [self.image(s)[1] for s in scenes]
            yield self._rec(item, q, None, [TARGET_IMAGE_TEXT] * len(images), images, n_hard=len(hard))

    def _i2t(self) -> Iterator[EvalRecord]:
        pool = self.pool_scenes(self._pool_size())
        tmpl = CAPTION_TEMPLATES[self.split]
        for q, rng, item in self._items():
            hard = self._hard_scenes(item.scene, rng)
            taken = {item.scene.caption_key()} | {h.caption_key() for h in hard}
            easy = self._pool_fill(pool, rng, taken, self.n_distractors - len(hard))

            def cap(s: Scene) -> str:
                order = list(range(len(s.objects)))
                rng.shuffle(order)
                return s.coarse_caption(tmpl, order)

            texts = [item.pos_text] + [cap(s) for s in hard + easy]
            yield self._rec(item, q, self.image(item.scene)[1], texts, [None] * len(texts), n_hard=len(hard))

    def _ground(self) -> Iterator[EvalRecord]:
        crop_out = crop_size_for(self.image_size)
        pool_crops: list[tuple[str, ImageRef]] = []
        for s in self.pool_scenes(max(4, self.n_distractors // 3 + 4)):
            img = render_scene(s, self.image_size)
            for i, o in enumerate(s.objects):
                pool_crops.append((o.label, self.ref(crop_object(img, s, i, crop_out))))
        for q, rng, item in self._items():
            img, qref = self.image(item.scene, need_pixels=True)
            tgt = item.target
            assert tgt is not None
            label = item.scene.objects[tgt].label
            crops = [self.ref(crop_object(img, item.scene, tgt, crop_out))]
            # hardest: the other objects of the same scene (the same label too: told apart by context)
            for i in range(len(item.scene.objects)):
                if i != tgt and len(crops) <= self.n_distractors:
                    crops.append(self.ref(crop_object(img, item.scene, i, crop_out)))
            n_hard = len(crops) - 1
            order = list(range(len(pool_crops)))
            rng.shuffle(order)
            seen = {c.path or digest(c.bytes or b"") for c in crops}
            for j in order:
                if len(crops) > self.n_distractors:
                    break
                lab, ref = pool_crops[j]
                key = ref.path or digest(ref.bytes or b"")
                if lab != label and key not in seen:  # a same-label crop elsewhere would be ambiguous
                    seen.add(key)
                    crops.append(ref)
            yield self._rec(item, q, qref, [TARGET_CROP_TEXT] * len(crops), list(crops), n_hard=n_hard)


def iter_eval_sets(
    eval_per_task: int = 200, n_distractors: int = 999, seed: int = 0, *, image_size: int = 112,
    datasets: list[str] | None = None, store: ImageStore | None = None, n_hard: int = 8,
) -> Iterator[EvalRecord]:
    """Evaluation records for the scenes datasets (all of :data:`DATASETS` by default), one dataset
    after the other. ``store(dataset, png_bytes) -> ImageRef`` decides how images are kept (default:
    embedded bytes; :func:`build_benchmark` writes content-addressed files instead)."""
    for name in dataset_names(datasets):
        yield from _EvalBuilder(name, eval_per_task, n_distractors, seed, image_size, store or _embed_store, n_hard).records()
