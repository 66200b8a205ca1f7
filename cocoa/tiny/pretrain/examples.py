"""The generative examples: what each PairRecord teaches (image + prompt -> response), the pre-training
captions written from a scene graph, and the held-out examples of the end-of-run check.

Scene graphs are said in English by :mod:`cocoa.sources.scenes.english` with its ``PRETRAIN`` wording
(thirds at 0.37 / 0.63, "in the center", "with 'K' printed on it"): the text the cached pre-trained models
were trained on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from ...records import ImageRef, PairRecord, RecordError, digest
from ...sources.scenes.english import PRETRAIN, article, band, join, object_phrase, where

IMAGE_PLACEHOLDER = "<|image_1|>"
SHORT_KINDS = ("count", "objects", "pair")  # curriculum: short answers the image alone determines
SHORT_CHARS = 48  # longer "pair" responses (retrieval captions) wait for the full mix
COUNT_PROMPT = "How many objects are in the image?"
OBJECTS_PROMPT = "Name the objects from top left to bottom right."
CAPTION_PROMPTS = (
    "Describe the image in detail.",
    "Give a detailed caption of this scene.",
    "What is in this picture? Describe every object.",
)


# --------------------------------------------------------------------------------------------------
# captions from scene graphs (``Scene.to_dict()`` layout: objects are dicts)
# --------------------------------------------------------------------------------------------------
def _where(o: dict[str, Any]) -> str:
    return where(float(o["x"]), float(o["y"]), PRETRAIN)


def _obj_phrase(o: dict[str, Any]) -> str:
    return object_phrase(o["size"], o["material"], o["color"], o["shape"], o.get("text"), PRETRAIN)


def describe_scene(scene: dict[str, Any], rng: random.Random, max_relations: int = 2) -> str:
    """A detailed caption of a scene graph (``Scene.to_dict()`` layout): count, every object with size,
    material, colour, shape, printed text and position, and up to ``max_relations`` relations."""
    try:
        objs = list(scene["objects"])
        if not objs:
            raise ValueError("no objects")
        parts = [f"{article(_obj_phrase(o))} {_where(o)}" for o in reading_order(objs)]
    except (KeyError, TypeError, ValueError) as e:
        raise RecordError(f"meta['scene'] is not a scene graph ({type(e).__name__}: {e}); "
                          "expected Scene.to_dict() output with objects") from None
    n = len(objs)
    text = f"{n} object{'s' if n != 1 else ''}: {join(parts)}."
    rels = [r for r in scene.get("relations", []) if r.get("relation") != "overlapping"
            and 0 <= r.get("subject", -1) < n and 0 <= r.get("object", -1) < n]
    rels = [r for r in rels if r["subject"] < r["object"]]  # each pair once
    for r in rng.sample(rels, min(max_relations, len(rels))):
        a, b = objs[r["subject"]], objs[r["object"]]
        text += f" The {a['color']} {a['shape']} is {r['relation']} the {b['color']} {b['shape']}."
    over = [r for r in scene.get("relations", []) if r.get("relation") == "overlapping"]
    if over:
        text += f" {len(over)} pair{'s' if len(over) != 1 else ''} of objects overlap."
    return text


def _band(o: dict[str, Any]) -> int:
    return band(float(o["y"]), PRETRAIN)


def reading_order(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The objects top band first, left to right within a band (the order the captions list them in).

    The scene generator's object order is arbitrary; a caption that followed it would ask the model to
    guess which object comes first, which the image cannot tell: in reading order every word of the
    caption is determined by the image."""
    return sorted(objs, key=lambda o: (_band(o), float(o["x"]), float(o["y"])))


def describe_objects(scene: dict[str, Any]) -> str:
    """The short image-only answer: colour and shape of every object in reading order."""
    return ", ".join(f"{o['color']} {o['shape']}" for o in reading_order(list(scene["objects"])))


def describe_target(scene: dict[str, Any], i: int) -> str:
    o = scene["objects"][i]
    return f"the {_obj_phrase(o)} {_where(o)}"


# --------------------------------------------------------------------------------------------------
# examples
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    image: ImageRef
    prompt: str  # may contain <|image_1|>; if not, the image block goes first
    response: str
    kind: str
    record_id: str


def examples_from_record(rec: PairRecord, seed: int = 0) -> list[Example]:
    """The generative examples one PairRecord yields (possibly none, e.g. a text-only pair)."""
    out: list[Example] = []
    if rec.qry_image is not None and rec.pos_image is None and rec.pos_text.strip():
        out.append(Example(rec.qry_image, rec.qry_text, rec.pos_text.strip(), "pair", rec.id))
    scene = rec.meta.get("scene") if isinstance(rec.meta, dict) else None
    if isinstance(scene, dict):
        img = rec.qry_image if rec.qry_image is not None else rec.pos_image
        if img is not None:
            rng = random.Random(digest(f"{seed}:{rec.id}"))
            out.append(Example(img, rng.choice(CAPTION_PROMPTS), describe_scene(scene, rng), "caption", rec.id))
            n = len(scene.get("objects", []))
            out.append(Example(img, COUNT_PROMPT, str(n), "count", rec.id))
            out.append(Example(img, OBJECTS_PROMPT, describe_objects(scene), "objects", rec.id))
            target = rec.meta.get("target")
            if rec.qry_image is not None and isinstance(target, int) and 0 <= target < len(scene.get("objects", [])):
                out.append(Example(rec.qry_image, rec.qry_text, describe_target(scene, target), "grounding", rec.id))
    return out


def image_block(n_pad: int = 1) -> str:
    return "<|vision_start|>" + "<|image_pad|>" * n_pad + "<|vision_end|>"


def prompt_text(prompt: str) -> str:
    """The prompt with the image block in place of ``<|image_1|>`` (or first when there is none)."""
    if IMAGE_PLACEHOLDER in prompt:
        return prompt.replace(IMAGE_PLACEHOLDER, image_block(), 1).replace(IMAGE_PLACEHOLDER, "")
    return image_block() + prompt


def heldout_examples(n_scenes: int = 96, seed: int = 7) -> list[Example]:
    """Held-out scenes examples (a generator seed the default training data never uses): the text-positive
    answers and the detailed captions, for :func:`image_gap`."""
    from ...sources import scenes

    return [ex for rec in scenes.iter_train_pairs(n_scenes, seed=seed) for ex in examples_from_record(rec)
            if ex.kind in ("pair", "caption", "objects")]

