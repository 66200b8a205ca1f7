"""The programmatic teacher for the procedural scenes: fine-grained text written from the scene graph.

The scenes source keeps each image's scene graph in ``PairRecord.meta["scene"]``; its own texts are
deliberately coarse (``"a photo with a red cube and a blue sphere"``). This teacher writes what they
leave out: counts, sizes, materials, positions, pairwise relations and printed characters, as a caption
or as ``k`` question-answer pairs, in the same JSON the model backends must produce (so every output
goes through the same validation). It needs no model, so the embedded default pipeline runs anywhere.

For a grounding pair's positive image (a crop around one object, ``meta["target"]``) the text is about
that object only. Objects and positions are phrased by :mod:`cocoa.sources.scenes.english` with its
``TEACHER`` wording (thirds at 0.36 / 0.64, "in the centre", "with the character 'K' printed on it").
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

from ...sources.scenes.english import TEACHER, article, count_phrase, join, object_phrase, where
from .base import Teacher, TeacherRequest, TeacherResult


def _obj_phrase(o: Any) -> str:
    return object_phrase(o.size, o.material, o.color, o.shape, o.text, TEACHER)


def _where(o: Any) -> str:
    return where(o.x, o.y, TEACHER)


class ScenesTeacher(Teacher):
    """Writes captions and QA for scene images from ``context["meta"]["scene"]`` (a ``Scene.to_dict()``)."""

    backend = "scenes"
    structured = True
    batch_size = 64

    def __init__(self, model: str = "cocoa/scenes-teacher", revision: str = "1") -> None:
        self.model = model
        self.revision = revision

    def generate(self, requests: Sequence[TeacherRequest]) -> list[TeacherResult]:
        from ...sources.scenes import Scene

        out = []
        for r in requests:
            meta = r.context.get("meta") or {}
            graph = meta.get("scene")
            if not isinstance(graph, dict):
                out.append(TeacherResult(
                    r.key, None, error="the record has no scene graph (meta['scene']); the scenes teacher only "
                    "serves the scenes source: use --backend vllm|openai|transformers for other data",
                    error_kind="rejected"))
                continue
            try:
                scene = Scene.from_dict(graph)
            except Exception as e:  # a malformed graph is this record's problem, not the run's
                out.append(TeacherResult(r.key, None, error=f"invalid scene graph: {e}", error_kind="rejected"))
                continue
            rng = random.Random(r.seed)
            # a grounding pair's positive image is a crop around one object: write about that object
            focus = meta.get("target") if r.context.get("role") == "positive" and meta.get("task") == "grounding" else None
            if r.task == "caption":
                data: dict[str, Any] = {"caption": caption(scene, rng, focus)}
            else:
                data = {"qa": [{"question": q, "answer": a} for q, a in qa_pairs(scene, rng, r.k, focus)]}
            text = json.dumps(data, ensure_ascii=False)
            out.append(TeacherResult(r.key, text, prompt_tokens=len(r.prompt.split()), completion_tokens=len(text.split())))
        return out


def caption(scene: Any, rng: random.Random, focus: int | None = None) -> str:
    objs = scene.objects
    if focus is not None and 0 <= focus < len(objs):
        o = objs[focus]
        s = f"A close-up crop of {article(_obj_phrase(o))}"
        others = [p for i, p in enumerate(objs) if i != focus and scene.relation(focus, i)["overlapping"]]
        if others:
            s += ", partly overlapping " + join([article(f"{p.color} {p.shape}") for p in others])
        return s + "."
    labels = Counter(f"{o.color} {o.shape}" for o in objs)
    parts = [count_phrase(n, lab) for lab, n in sorted(labels.items(), key=lambda kv: (-kv[1], kv[0]))]
    opening = rng.choice([
        "The scene shows {n}: {parts}.",
        "There are {n} in this picture: {parts}.",
        "A rendered scene with {n}: {parts}.",
    ])
    sentences = [opening.format(n=count_phrase(len(objs), "object"), parts=join(parts))]
    for o in objs:
        sentences.append(f"{article(_obj_phrase(o))[0].upper()}{article(_obj_phrase(o))[1:]} is {_where(o)}.")
    rels = []
    for rel in scene.relations():
        if rel["relation"] in ("left of", "above", "overlapping"):
            a, b = scene.refer(rel["subject"]), scene.refer(rel["object"])
            if a and b:
                word = {"left of": "is left of", "above": "is above", "overlapping": "overlaps"}[rel["relation"]]
                rels.append(f"the {a} {word} the {b}")
    rng.shuffle(rels)
    if rels:
        r = join(rels[:3])
        sentences.append(r[0].upper() + r[1:] + ".")
    return " ".join(sentences)


def qa_pairs(scene: Any, rng: random.Random, k: int, focus: int | None = None) -> list[tuple[str, str]]:
    """Up to ``k`` distinct, correct question-answer pairs about the scene (or the focused object)."""
    objs = scene.objects
    pool: list[tuple[str, str]] = []
    idx = [focus] if focus is not None and 0 <= focus < len(objs) else list(range(len(objs)))
    for i in idx:
        ref = "object" if focus is not None else scene.refer(i)
        if not ref:
            continue
        o = objs[i]
        pool += [
            (f"What is the size of the {ref}?", o.size),
            (f"What is the surface of the {ref}: matte, metallic or striped?", o.material),
            (f"Where in the image is the {ref}?", _where(o).removeprefix("at the ").removeprefix("on the ").removeprefix("in the ")),
        ]
        if focus is not None:
            pool += [("What colour is the object?", o.color), ("What shape is the object?", o.shape)]
        if o.text:
            pool.append((f"Which character is printed on the {ref}?", o.text))
    if focus is None:
        pool.append(("How many objects are in the scene?", str(len(objs))))
        for color, n in Counter(o.color for o in objs).items():
            pool.append((f"How many {color} objects are there?", str(n)))
        for shape, n in Counter(o.shape for o in objs).items():
            pool.append((f"How many {shape}s are there?", str(n)))
        for size, n in Counter(o.size for o in objs).items():
            pool.append((f"How many {size} objects are there?", str(n)))
        for rel in scene.relations():
            a, b = scene.refer(rel["subject"]), scene.refer(rel["object"])
            if a and b and rel["relation"] != "overlapping":
                pool.append((f"Is the {a} {rel['relation']} the {b}?", "yes"))
        with_text = [o for o in objs if o.text]
        pool.append(("How many objects have a character printed on them?", str(len(with_text))))
    seen: set[str] = set()
    uniq = []
    for q, a in pool:
        if q.casefold() not in seen:
            seen.add(q.casefold())
            uniq.append((q, a))
    rng.shuffle(uniq)
    return uniq[:k]
