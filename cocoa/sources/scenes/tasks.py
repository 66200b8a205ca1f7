"""MMEB's four meta-tasks on scenes: one task instance (scene + coarse query/positive texts) per seeded
draw, and the stream of training pairs (:func:`iter_train_pairs`)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ...records import ImageRef, PairRecord, RecordError
from .graph import Scene, keyed_rng, sample_scene
from .render import crop_object, png_bytes, render_scene
from .vocab import (ANSWER_TYPES, CAPTION_TEMPLATES, COLOR_NAMES, HELD_OUT_COMBOS, PROMPTS, QUESTIONS, SHAPES,
                    TARGET_CROP_TEXT, TARGET_IMAGE_TEXT, TASKS, TRAIN_SOURCE)

@dataclass
class TaskItem:
    """One task instance: a scene plus query/positive texts (before images are attached)."""

    task: str
    scene: Scene
    qry_text: str
    pos_text: str
    target: int | None = None  # grounding target / asked object
    qtype: str | None = None
    answer_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def annotate(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Add the asked/cropped object and the VQA question and answer type to a record's ``meta``."""
        if self.target is not None:
            meta["target"] = self.target
        if self.qtype:
            meta["qtype"], meta["answer_type"] = self.qtype, self.answer_type
        return meta


def _scene_for(task: str, rng: random.Random, split: str, seed: str) -> Scene:
    forbid = HELD_OUT_COMBOS if split == "IND" else frozenset()
    main = None
    if split == "OOD":
        c, s = rng.choice(sorted(HELD_OUT_COMBOS))
        main = {"color": c, "shape": s}
    kw: dict[str, Any] = {"forbid": forbid, "main": main, "seed": seed}
    if task == "classification":
        return sample_scene(rng, main_large=True, **kw)
    if task == "grounding":
        return sample_scene(rng, min_objects=2, **kw)
    return sample_scene(rng, **kw)


def _vqa(scene: Scene, rng: random.Random, split: str, main_first: bool) -> tuple[str, str, str, int | None]:
    """(qtype, question, answer, asked object) for a feasible question about ``scene``."""
    objs = scene.objects
    n = len(objs)
    candidates: list[tuple[str, dict[str, Any], str, int | None]] = []
    ask = [0] if main_first else list(range(n))
    for i in ask:
        ref = scene.refer(i)
        if ref is None:
            continue
        o = objs[i]
        if scene.count(shape=o.shape) == 1:
            candidates.append(("color_of", {"ref": o.shape}, o.color, i))
        if scene.count(color=o.color) == 1:
            candidates.append(("shape_of", {"ref": f"{o.color} object"}, o.shape, i))
        candidates.append(("material_of", {"ref": ref}, o.material, i))
        candidates.append(("size_of", {"ref": ref}, o.size, i))
        if o.text:
            candidates.append(("text_on", {"ref": ref}, o.text, i))
        candidates.append(("exist", {"color": o.color, "shape": o.shape}, "yes", i))
        for j in range(n):
            rj = scene.refer(j)
            if j == i or rj is None:
                continue
            rel = scene.relation(i, j)
            for a_rel, b_rel in (("left of", "right of"), ("above", "below")):
                if rel[a_rel] or rel[b_rel]:
                    asked = rng.choice((a_rel, b_rel))
                    candidates.append(("relation", {"a": ref, "b": rj, "rel": asked}, "yes" if rel[asked] else "no", i))
    if not main_first:
        candidates.append(("count_all", {}, str(n), None))
        c = rng.choice(COLOR_NAMES)
        candidates.append(("count_color", {"color": c}, str(scene.count(color=c)), None))
        s = rng.choice(SHAPES)
        candidates.append(("count_shape", {"shape": s}, str(scene.count(shape=s)), None))
        # "no" existence questions about a near miss: a present colour with another shape
        o = rng.choice(objs)
        s2 = rng.choice([s for s in SHAPES if scene.count(color=o.color, shape=s) == 0] or [o.shape])
        if scene.count(color=o.color, shape=s2) == 0 and (split == "OOD" or (o.color, s2) not in HELD_OUT_COMBOS):
            candidates.append(("exist", {"color": o.color, "shape": s2}, "no", None))
    if not candidates:  # a main object without a unique reference: ask about its colour count
        o = objs[0]
        return "count_color", QUESTIONS["count_color"][split].format(color=o.color), str(scene.count(color=o.color)), 0
    # balance question types first, then pick an instance
    qtype = rng.choice(sorted({c[0] for c in candidates}))
    qt, slots, ans, i = rng.choice([c for c in candidates if c[0] == qtype])
    return qt, QUESTIONS[qt][split].format(**slots), ans, i


def make_item(task: str, rng: random.Random, split: str, seed: str) -> TaskItem:
    """Sample a scene and build the task's coarse query/positive texts."""
    for _ in range(50):
        scene = _scene_for(task, rng, split, seed)
        prompt = rng.choice(PROMPTS[task][split])
        if task == "classification":
            return TaskItem(task, scene, prompt, scene.objects[0].label, target=0)
        if task == "vqa":
            # OOD: most questions ask about the held-out object, the rest use held-out phrasings only
            qt, q, a, i = _vqa(scene, rng, split, main_first=split == "OOD" and rng.random() < 0.6)
            return TaskItem(task, scene, prompt.format(q=q), a, target=i, qtype=qt, answer_type=ANSWER_TYPES[qt])
        if task in ("retrieval_t2i", "retrieval_i2t"):
            order = list(range(len(scene.objects)))
            rng.shuffle(order)
            cap = scene.coarse_caption(CAPTION_TEMPLATES[split], order)
            if task == "retrieval_t2i":
                return TaskItem(task, scene, prompt.format(c=cap), TARGET_IMAGE_TEXT, extra={"caption": cap})
            return TaskItem(task, scene, prompt, cap, extra={"caption": cap})
        if task == "grounding":
            idx = [0] if split == "OOD" else list(range(len(scene.objects)))
            idx = [i for i in idx if scene.refer(i) is not None]
            if not idx:
                continue
            i = rng.choice(idx)
            return TaskItem(task, scene, prompt.format(r=scene.refer(i)), TARGET_CROP_TEXT, target=i)
    raise RecordError(f"could not sample a {task} scene in 50 tries (seed {seed})")


def _train_tasks(weights: dict[str, float] | None) -> tuple[list[str], list[float]]:
    w = weights or {"classification": 1.0, "vqa": 1.5, "retrieval_t2i": 1.0, "retrieval_i2t": 1.0, "grounding": 1.0}
    unknown = set(w) - set(TASKS)
    if unknown:
        raise RecordError(f"unknown scenes task(s) {sorted(unknown)}; known: {', '.join(TASKS)}")
    tasks = [t for t in TASKS if w.get(t, 0) > 0]
    return tasks, [w[t] for t in tasks]


def iter_train_pairs(
    n: int, seed: int = 0, *, image_size: int = 112, start: int = 0,
    task_weights: dict[str, float] | None = None,
) -> Iterator[PairRecord]:
    """``n`` training pairs (records ``start .. start+n-1`` of the stream for ``seed``).

    Record ``i`` depends only on ``(seed, i)``: streams can be resumed or split. Images are embedded
    as PNG bytes. ``meta``: ``task``, ``scene`` (the image's scene graph), ``index``, ``image_size``,
    and per task ``target`` (asked/cropped object), ``qtype``/``answer_type`` (VQA), ``caption``.
    """
    tasks, weights = _train_tasks(task_weights)
    for i in range(start, start + n):
        rng = keyed_rng("scenes-train", seed, i)
        task = rng.choices(tasks, weights)[0]
        item = make_item(task, rng, "IND", seed=f"{seed}:train:{i}")
        img = render_scene(item.scene, image_size)
        full = ImageRef(bytes=png_bytes(img))
        meta = item.annotate({"task": task, "scene": item.scene.to_dict(), "index": i, "image_size": image_size})
        meta.update(item.extra)
        src = TRAIN_SOURCE[task]
        if task == "retrieval_t2i":
            yield PairRecord(source=src, qry_text=item.qry_text, pos_text=item.pos_text, pos_image=full, meta=meta)
        elif task == "grounding":
            crop = ImageRef(bytes=png_bytes(crop_object(img, item.scene, item.target)))  # type: ignore[arg-type]
            yield PairRecord(source=src, qry_text=item.qry_text, qry_image=full, pos_text=item.pos_text, pos_image=crop, meta=meta)
        else:
            yield PairRecord(source=src, qry_text=item.qry_text, qry_image=full, pos_text=item.pos_text, meta=meta)
