"""Procedural CLEVR-style scenes: an embedded, MMEB-shaped benchmark that needs no download.

A :class:`Scene` is a small scene graph (1-6 objects with shape, colour, size, material/texture,
position and an optional printed character); :func:`render_scene` draws it with Pillow,
deterministically (same scene + size -> byte-identical PNG). From scenes we build:

* training pairs (:func:`iter_train_pairs`, :class:`~cocoa.records.PairRecord`) for MMEB's four
  meta-tasks: classification, VQA, retrieval (text->image and image->text) and grounding. Their texts
  are deliberately coarse (``"red cube"``, ``"a photo with a red cube and a blue sphere"``): sizes,
  materials, counts, relations and printed text are left for a teacher to add. Every record keeps
  its scene graph in ``meta["scene"]`` so a programmatic teacher can write detailed text from it;
* evaluation sets (:func:`iter_eval_sets`, :class:`~cocoa.records.EvalRecord`) with MMEB's protocol:
  candidate 0 is the positive; classification ranks all labels, the other tasks 1 positive + N
  distractors, hard ones first (same objects with one attribute changed, other objects of the same
  scene, answers of the same type). ``-OOD`` datasets use colour x shape combinations never seen in
  training (:data:`HELD_OUT_COMBOS`) and instruction/question phrasings never seen in training.

:func:`build_benchmark` writes ``root/original`` (PairRecord shards) and ``root/eval/<Dataset>/``
(EvalRecord shards + a content-addressed ``images/`` folder referenced by relative path).
"""

from __future__ import annotations

import functools
import hashlib
import io
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..fs import NotOwnedError, exclusive_lock, has_content, is_owned, mark_owned, remove_owned_tree
from ..records import EvalRecord, ImageRef, PairRecord, RecordError, digest

# ---------------------------------------------------------------------------------------------
# vocabulary
# ---------------------------------------------------------------------------------------------
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 40, 40),
    "green": (46, 160, 67),
    "blue": (38, 86, 214),
    "yellow": (238, 200, 30),
    "purple": (134, 62, 186),
    "orange": (245, 128, 24),
    "cyan": (32, 190, 204),
    "brown": (122, 76, 38),
}
SHAPES: tuple[str, ...] = ("cube", "sphere", "cylinder", "cone", "star", "ring")
SIZES: dict[str, float] = {"small": 0.085, "large": 0.14}  # radius as a fraction of the image side
MATERIALS: tuple[str, ...] = ("matte", "metallic", "striped")
TEXTS: tuple[str, ...] = tuple("ABEHKMRSTXZ2345789")
MAX_OBJECTS = 6
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

# Colour x shape combinations that never occur in training scenes (one per colour, every shape at
# least once): the OOD datasets are built around them.
HELD_OUT_COMBOS: frozenset[tuple[str, str]] = frozenset(
    (c, SHAPES[(5 * i + 1) % len(SHAPES)]) for i, c in enumerate(COLOR_NAMES)
)
ALL_LABELS: tuple[str, ...] = tuple(f"{c} {s}" for c in COLOR_NAMES for s in SHAPES)

IND_DATASETS = ("SceneCls", "SceneVQA", "SceneT2I", "SceneI2T", "SceneGround")
DATASETS: dict[str, dict[str, str]] = {}
for _name, _mt, _task in zip(
    IND_DATASETS,
    ("classification", "vqa", "retrieval", "retrieval", "grounding"),
    ("classification", "vqa", "retrieval_t2i", "retrieval_i2t", "grounding"),
):
    DATASETS[_name] = {"meta_task": _mt, "task": _task, "split": "IND"}
    DATASETS[_name + "-OOD"] = {"meta_task": _mt, "task": _task, "split": "OOD"}
TASKS = ("classification", "vqa", "retrieval_t2i", "retrieval_i2t", "grounding")
TRAIN_SOURCE = {t: n for n, t in zip(IND_DATASETS, TASKS)}

IMG = "<|image_1|>"
# MMEB-style instructions. Training (= IND) and held-out (OOD) phrasings never overlap.
PROMPTS: dict[str, dict[str, list[str]]] = {
    "classification": {
        "IND": [f"{IMG}\nRepresent the given image for classification of its main object."],
        "OOD": [f"{IMG}\nWhich object category is the largest thing in this picture?"],
    },
    "vqa": {
        "IND": [f"{IMG}\nRepresent the given image with the following question: {{q}}"],
        "OOD": [f"{IMG}\nLook at the picture and answer: {{q}}"],
    },
    "retrieval_t2i": {
        "IND": ["Find me a scene image that matches the given caption: {c}"],
        "OOD": ["Retrieve the rendered picture described here: {c}"],
    },
    "retrieval_i2t": {
        "IND": [f"{IMG}\nFind a caption describing the given scene image."],
        "OOD": [f"{IMG}\nWhich description fits this rendering?"],
    },
    "grounding": {
        "IND": [f"{IMG}\nSelect the portion of the image that isolates the object of the given label: {{r}}"],
        "OOD": [f"{IMG}\nCrop out the region showing {{r}}."],
    },
}
CAPTION_TEMPLATES = {"IND": "a photo with {x}", "OOD": "a rendered picture containing {x}"}
TARGET_IMAGE_TEXT = f"{IMG}\nRepresent the given image."
TARGET_CROP_TEXT = f"{IMG}\nRepresent the given cropped image of the object."

# VQA question templates: qtype -> split -> template (OOD phrasings are held out from training).
QUESTIONS: dict[str, dict[str, str]] = {
    "count_all": {"IND": "How many objects are there?", "OOD": "What is the total number of things in the picture?"},
    "count_color": {"IND": "How many {color} objects are there?", "OOD": "Count the {color} things. How many?"},
    "count_shape": {"IND": "How many {shape}s are there?", "OOD": "What number of {shape}s can you see?"},
    "color_of": {"IND": "What color is the {ref}?", "OOD": "Which colour does the {ref} have?"},
    "shape_of": {"IND": "What shape is the {ref}?", "OOD": "The {ref} has which shape?"},
    "material_of": {"IND": "What is the surface of the {ref}?", "OOD": "How would you describe the finish of the {ref}?"},
    "size_of": {"IND": "What size is the {ref}?", "OOD": "Is the {ref} big or little? Give its size."},
    "exist": {"IND": "Is there a {color} {shape}?", "OOD": "Does the picture contain a {color} {shape}?"},
    "relation": {"IND": "Is the {a} {rel} the {b}?", "OOD": "Would you say the {a} is {rel} the {b}?"},
    "text_on": {"IND": "What is written on the {ref}?", "OOD": "Which character is printed on the {ref}?"},
}
ANSWER_TYPES = {
    "count_all": "number", "count_color": "number", "count_shape": "number", "color_of": "color",
    "shape_of": "shape", "material_of": "material", "size_of": "size", "exist": "yesno",
    "relation": "yesno", "text_on": "text",
}
NUMBER_WORDS = [str(i) for i in range(0, MAX_OBJECTS + 1)]
ANSWERS_BY_TYPE: dict[str, list[str]] = {
    "number": NUMBER_WORDS,
    "color": list(COLOR_NAMES),
    "shape": list(SHAPES),
    "material": list(MATERIALS),
    "size": list(SIZES),
    "yesno": ["yes", "no"],
    "text": list(TEXTS),
}
REL_MARGIN = 0.06  # centres must differ by this much (image fraction) for left/right/above/below


# ---------------------------------------------------------------------------------------------
# scene graph
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    material: str
    x: float  # centre, fraction of the image width (0 = left)
    y: float  # centre, fraction of the image height (0 = top)
    text: str | None = None  # a printed character (large objects only), or None

    @property
    def radius(self) -> float:
        return SIZES[self.size]

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        r = self.radius
        return (self.x - r, self.y - r, self.x + r, self.y + r)

    @property
    def label(self) -> str:
        """Coarse label, as in MMEB classification: ``"red cube"``."""
        return f"{self.color} {self.shape}"

    def describe(self) -> str:
        """Fine-grained description: ``"large metallic red cube with the letter K"``."""
        s = f"{self.size} {self.material} {self.color} {self.shape}"
        return s + (f" with '{self.text}' printed on it" if self.text else "")


@dataclass(frozen=True)
class Scene:
    """A scene graph. Objects are listed back to front (drawing order); coordinates are fractions."""

    objects: tuple[SceneObject, ...]
    seed: str = ""

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise RecordError(f"a scene has 1..{MAX_OBJECTS} objects, not {len(self.objects)}")

    # -- derived facts ----------------------------------------------------------------------
    def count(self, **attrs: str) -> int:
        return sum(all(getattr(o, k) == v for k, v in attrs.items()) for o in self.objects)

    def combos(self) -> set[tuple[str, str]]:
        return {(o.color, o.shape) for o in self.objects}

    def relation(self, i: int, j: int) -> dict[str, bool]:
        a, b = self.objects[i], self.objects[j]
        return {
            "left of": a.x < b.x - REL_MARGIN,
            "right of": a.x > b.x + REL_MARGIN,
            "above": a.y < b.y - REL_MARGIN,
            "below": a.y > b.y + REL_MARGIN,
            "overlapping": (a.x - b.x) ** 2 + (a.y - b.y) ** 2 < (a.radius + b.radius) ** 2,
        }

    def relations(self) -> list[dict[str, Any]]:
        out = []
        for i in range(len(self.objects)):
            for j in range(len(self.objects)):
                if i == j:
                    continue
                for rel, holds in self.relation(i, j).items():
                    if holds and not (rel == "overlapping" and j < i):
                        out.append({"subject": i, "relation": rel, "object": j})
        return out

    def to_dict(self) -> dict[str, Any]:
        objs = []
        for i, o in enumerate(self.objects):
            d = asdict(o)
            d["id"] = i
            d["x"], d["y"] = round(o.x, 4), round(o.y, 4)
            d["bbox"] = [round(v, 4) for v in o.bbox]
            objs.append(d)
        return {"seed": self.seed, "objects": objs, "relations": self.relations(), "count": len(objs)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        try:
            objs = tuple(
                SceneObject(shape=o["shape"], color=o["color"], size=o["size"], material=o["material"],
                            x=float(o["x"]), y=float(o["y"]), text=o.get("text"))
                for o in d["objects"]
            )
        except (KeyError, TypeError) as e:
            raise RecordError(f"not a scene graph ({type(e).__name__}: {e}); expected Scene.to_dict() output") from None
        return cls(objects=objs, seed=str(d.get("seed", "")))

    # -- language -------------------------------------------------------------------------------
    def refer(self, i: int) -> str | None:
        """The shortest unique referring expression for object ``i`` (None if there is none)."""
        o = self.objects[i]
        for keys in (("color", "shape"), ("size", "color", "shape"), ("material", "color", "shape"),
                     ("size", "material", "color", "shape")):
            if self.count(**{k: getattr(o, k) for k in keys}) == 1:
                return " ".join(getattr(o, k) for k in keys)
        same = [j for j, p in enumerate(self.objects) if p.label == o.label]
        xs = sorted(same, key=lambda j: self.objects[j].x)
        if len(xs) == 2 and abs(self.objects[xs[0]].x - self.objects[xs[1]].x) > 2 * REL_MARGIN:
            return f"{'left' if i == xs[0] else 'right'} {o.label}"
        return None

    def coarse_caption(self, template: str = CAPTION_TEMPLATES["IND"], order: list[int] | None = None) -> str:
        """Coarse caption: the distinct colour-shape labels, no counts, sizes, materials or layout."""
        labels: list[str] = []
        for j in order if order is not None else range(len(self.objects)):
            lab = self.objects[j].label
            if lab not in labels:
                labels.append(lab)
        return template.format(x=_join([_article(lab) for lab in labels]))

    def caption_key(self) -> frozenset[str]:
        return frozenset(o.label for o in self.objects)


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _rng(*parts: Any) -> random.Random:
    """A random stream keyed by its parts (stable across Python runs and platforms)."""
    return random.Random(int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big"))


def sample_scene(
    rng: random.Random,
    *,
    n_objects: int | None = None,
    min_objects: int = 1,
    max_objects: int = MAX_OBJECTS,
    forbid: frozenset[tuple[str, str]] | set[tuple[str, str]] = HELD_OUT_COMBOS,
    main: dict[str, str] | None = None,
    main_large: bool = False,
    text_prob: float = 0.35,
    seed: str = "",
) -> Scene:
    """Sample a scene. ``forbid``: colour x shape pairs that must not appear (training excludes
    :data:`HELD_OUT_COMBOS`); ``main``: attributes forced on the first sampled object (e.g. a held-out
    combo for OOD); ``main_large``: the main object is the only large one (classification)."""
    n = n_objects or rng.randint(min_objects, max_objects)
    allowed = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in forbid]
    specs: list[dict[str, Any]] = []
    for k in range(n):
        c, s = rng.choice(allowed)
        spec: dict[str, Any] = {"color": c, "shape": s, "size": rng.choice(list(SIZES)), "material": rng.choice(MATERIALS)}
        if k > 0 and rng.random() < 0.35 and specs:  # hard content: share an attribute with another object
            other = rng.choice(specs)
            key = rng.choice(["color", "shape"])
            cand = dict(spec, **{key: other[key]})
            if (cand["color"], cand["shape"]) not in forbid:
                spec = cand
        if k == 0 and main:
            spec.update(main)
        if main_large:
            spec["size"] = "large" if k == 0 else "small"
        specs.append(spec)
    objs: list[SceneObject] = []
    for spec in specs:
        r = SIZES[spec["size"]]
        for attempt in range(60):
            x = rng.uniform(r + 0.03, 1 - r - 0.03)
            y = rng.uniform(r + 0.03, 1 - r - 0.03)
            slack = 0.72 if attempt < 40 else 0.55  # partial overlaps are allowed, full occlusion is not
            if all((x - o.x) ** 2 + (y - o.y) ** 2 >= (slack * (r + o.radius)) ** 2 for o in objs):
                break
        text = rng.choice(TEXTS) if spec["size"] == "large" and spec["shape"] != "ring" and rng.random() < text_prob else None
        objs.append(SceneObject(x=round(x, 4), y=round(y, 4), text=text, **spec))
    main_obj = objs[0]
    objs.sort(key=lambda o: (o.y, o.x))  # back to front
    if main or main_large:  # keep the main object first in the graph, draw order kept via y sort at render
        objs.remove(main_obj)
        objs.insert(0, main_obj)
    return Scene(objects=tuple(objs), seed=seed)


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------
SUPERSAMPLE = 2


@functools.lru_cache(maxsize=8)
def _background(size: int):  # type: ignore[no-untyped-def]
    from PIL import Image

    s = size * SUPERSAMPLE
    bg = Image.new("RGB", (1, s))
    for yy in range(s):
        t = yy / max(1, s - 1)
        bg.putpixel((0, yy), tuple(int(a + (b - a) * t) for a, b in zip((218, 220, 226), (176, 172, 166))))
    return bg.resize((s, s))


@functools.lru_cache(maxsize=8)
def _stripes(n: int):  # type: ignore[no-untyped-def]
    from PIL import Image, ImageDraw

    m = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(m)
    step = max(4, n // 5)
    for k in range(-n, 2 * n, step):
        d.line([(k, 0), (k + n, n)], fill=255, width=max(2, step // 2))
    return m


@functools.lru_cache(maxsize=16)
def _font(px: int):  # type: ignore[no-untyped-def]
    from PIL import ImageFont

    return ImageFont.load_default(size=px)


def _shade(c: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    if f >= 1:
        return tuple(int(v + (255 - v) * (f - 1)) for v in c)  # type: ignore[return-value]
    return tuple(int(v * f) for v in c)  # type: ignore[return-value]


def _silhouette(shape: str, r: float, n: int):  # type: ignore[no-untyped-def]
    """(mask, faces) for an object of radius r drawn in an n x n local patch centred at n/2."""
    import math

    from PIL import Image, ImageDraw

    m = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(m)
    c = n / 2
    faces: list[tuple[str, Any]] = []  # (kind, geometry) drawn lighter/darker for a 3D look
    if shape == "cube":
        f = r * 0.8
        dx = r * 0.35
        front = [c - f, c - f + dx, c + f - dx, c + f]
        top = [(c - f, c - f + dx), (c - f + dx, c - f), (c + f, c - f), (c + f - dx, c - f + dx)]
        side = [(c + f - dx, c - f + dx), (c + f, c - f), (c + f, c + f - dx), (c + f - dx, c + f)]
        d.rectangle(front, fill=255)
        d.polygon(top, fill=255)
        d.polygon(side, fill=255)
        faces = [("poly", top, 1.35), ("poly", side, 0.7)]
    elif shape == "sphere":
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
        faces = [("ellipse", [c - r * 0.7, c - r * 0.75, c + r * 0.25, c + r * 0.2], 1.18)]
    elif shape == "cylinder":
        w, h, e = r * 0.75, r * 0.9, r * 0.28
        d.rectangle([c - w, c - h + e, c + w, c + h - e], fill=255)
        d.ellipse([c - w, c + h - 2 * e, c + w, c + h], fill=255)
        d.ellipse([c - w, c - h, c + w, c - h + 2 * e], fill=255)
        faces = [("ellipse", [c - w, c - h, c + w, c - h + 2 * e], 1.35)]
    elif shape == "cone":
        e = r * 0.25
        d.polygon([(c, c - r), (c - r * 0.85, c + r - e), (c + r * 0.85, c + r - e)], fill=255)
        d.ellipse([c - r * 0.85, c + r - 2 * e, c + r * 0.85, c + r], fill=255)
        faces = [("poly", [(c, c - r), (c + r * 0.85, c + r - e), (c + r * 0.2, c + r - e)], 0.78)]
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((c + rad * math.cos(a), c + rad * math.sin(a) + r * 0.05))
        d.polygon(pts, fill=255)
    elif shape == "ring":
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
        hole = r * 0.48
        d.ellipse([c - hole, c - hole, c + hole, c + hole], fill=0)
    else:
        raise RecordError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return m, faces


@functools.lru_cache(maxsize=256)
def _geometry(shape: str, size: str, S: int):  # type: ignore[no-untyped-def]
    """Everything about an object's look that depends only on its shape, size and the canvas side
    (cached: a scene's objects are then a few pastes)."""
    from PIL import Image, ImageChops, ImageDraw, ImageFilter

    r = SIZES[size] * S
    n = int(2 * r + 8)
    n += n % 2
    mask, faces = _silhouette(shape, r, n)
    shadow = Image.new("L", (n, n), 0)
    ImageDraw.Draw(shadow).ellipse([n / 2 - r * 0.9, n / 2 + r * 0.55, n / 2 + r * 0.9, n / 2 + r * 1.0], fill=90)
    shadow = shadow.filter(ImageFilter.GaussianBlur(max(1, r / 6)))
    stripes = ImageChops.multiply(_stripes(n), mask)
    hl = Image.new("L", (n, n), 0)
    c = n / 2
    ImageDraw.Draw(hl).ellipse([c - r * 0.55, c - r * 0.6, c - r * 0.05, c - r * 0.15], fill=235)
    hl = ImageChops.multiply(hl.filter(ImageFilter.GaussianBlur(max(1, r / 7))), mask)
    edge = ImageChops.subtract(mask, mask.filter(ImageFilter.MinFilter(3)))
    return r, n, mask, faces, shadow, stripes, hl, edge


def _draw_object(canvas, o: SceneObject, S: int) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image, ImageDraw

    r, n, mask, faces, shadow, stripes, hl, edge = _geometry(o.shape, o.size, S)
    x0, y0 = int(round(o.x * S - n / 2)), int(round(o.y * S - n / 2))
    base = COLORS[o.color]
    canvas.paste((60, 58, 56), (x0 + int(r * 0.12), y0), shadow)
    fill = _shade(base, 1.12) if o.material == "metallic" else base
    patch = Image.new("RGB", (n, n), fill)
    pd = ImageDraw.Draw(patch)
    for kind, geom, f in faces:
        col = _shade(fill, f)
        (pd.polygon if kind == "poly" else pd.ellipse)(geom, fill=col)
    if o.material == "striped":
        patch.paste(_shade(base, 0.55), (0, 0), stripes)
    elif o.material == "metallic":
        patch.paste((255, 255, 255), (0, 0), hl)
    patch.paste(_shade(base, 0.45), (0, 0), edge)  # outline: the mask's edge in a darker tone
    if o.text:
        px = int(r * 0.95)
        fg = (255, 255, 255) if sum(base) < 420 or o.material == "striped" else (20, 20, 20)
        pd.text((n / 2, n / 2 + r * 0.08), o.text, font=_font(px), fill=fg, anchor="mm",
                stroke_width=max(1, px // 10), stroke_fill=_shade(base, 0.4) if fg[0] > 128 else _shade(base, 1.5))
    canvas.paste(patch, (x0, y0), mask)


def render_scene(scene: Scene, size: int = 112):  # type: ignore[no-untyped-def]
    """Render ``scene`` to a ``size`` x ``size`` RGB PIL image (deterministic)."""
    S = size * SUPERSAMPLE
    canvas = _background(size).copy()
    for o in sorted(scene.objects, key=lambda o: (o.y, o.x)):  # back to front
        _draw_object(canvas, o, S)
    return canvas.reduce(SUPERSAMPLE)  # box-filter downsampling: anti-aliased and fast


def crop_size_for(image_size: int) -> int:
    """Side of grounding crops: half the image, a multiple of 28 (patch 14 x merge 2)."""
    return max(28, int(round(image_size / 2 / 28)) * 28)


def crop_object(image, scene: Scene, i: int, out: int | None = None):  # type: ignore[no-untyped-def]
    """A square crop around object ``i`` (its box padded by 35%, some context), resized to ``out``."""
    from PIL import Image

    W = image.size[0]
    o = scene.objects[i]
    half = o.radius * 1.35 * W
    box = [int(round(o.x * W - half)), int(round(o.y * W - half)), int(round(o.x * W + half)), int(round(o.y * W + half))]
    crop = image.crop(box)  # outside the image is filled with black, like a padded crop
    out = out or crop_size_for(W)
    return crop.resize((out, out), Image.Resampling.BICUBIC)


def png_bytes(image) -> bytes:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# tasks
# ---------------------------------------------------------------------------------------------
@dataclass
class _TaskItem:
    """One task instance: a scene plus query/positive texts (before images are attached)."""

    task: str
    scene: Scene
    qry_text: str
    pos_text: str
    target: int | None = None  # grounding target / asked object
    qtype: str | None = None
    answer_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


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


def _make_item(task: str, rng: random.Random, split: str, seed: str) -> _TaskItem:
    """Sample a scene and build the task's coarse query/positive texts."""
    for _ in range(50):
        scene = _scene_for(task, rng, split, seed)
        prompt = rng.choice(PROMPTS[task][split])
        if task == "classification":
            return _TaskItem(task, scene, prompt, scene.objects[0].label, target=0)
        if task == "vqa":
            # OOD: most questions ask about the held-out object, the rest use held-out phrasings only
            qt, q, a, i = _vqa(scene, rng, split, main_first=split == "OOD" and rng.random() < 0.6)
            return _TaskItem(task, scene, prompt.format(q=q), a, target=i, qtype=qt, answer_type=ANSWER_TYPES[qt])
        if task in ("retrieval_t2i", "retrieval_i2t"):
            order = list(range(len(scene.objects)))
            rng.shuffle(order)
            cap = scene.coarse_caption(CAPTION_TEMPLATES[split], order)
            if task == "retrieval_t2i":
                return _TaskItem(task, scene, prompt.format(c=cap), TARGET_IMAGE_TEXT, extra={"caption": cap})
            return _TaskItem(task, scene, prompt, cap, extra={"caption": cap})
        if task == "grounding":
            idx = [0] if split == "OOD" else list(range(len(scene.objects)))
            idx = [i for i in idx if scene.refer(i) is not None]
            if not idx:
                continue
            i = rng.choice(idx)
            return _TaskItem(task, scene, prompt.format(r=scene.refer(i)), TARGET_CROP_TEXT, target=i)
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
        rng = _rng("scenes-train", seed, i)
        task = rng.choices(tasks, weights)[0]
        item = _make_item(task, rng, "IND", seed=f"{seed}:train:{i}")
        img = render_scene(item.scene, image_size)
        full = ImageRef(bytes=png_bytes(img))
        meta: dict[str, Any] = {"task": task, "scene": item.scene.to_dict(), "index": i, "image_size": image_size}
        if item.target is not None:
            meta["target"] = item.target
        if item.qtype:
            meta["qtype"], meta["answer_type"] = item.qtype, item.answer_type
        meta.update(item.extra)
        src = TRAIN_SOURCE[task]
        if task == "retrieval_t2i":
            yield PairRecord(source=src, qry_text=item.qry_text, pos_text=item.pos_text, pos_image=full, meta=meta)
        elif task == "grounding":
            crop = ImageRef(bytes=png_bytes(crop_object(img, item.scene, item.target)))  # type: ignore[arg-type]
            yield PairRecord(source=src, qry_text=item.qry_text, qry_image=full, pos_text=item.pos_text, pos_image=crop, meta=meta)
        else:
            yield PairRecord(source=src, qry_text=item.qry_text, qry_image=full, pos_text=item.pos_text, meta=meta)


# ---------------------------------------------------------------------------------------------
# evaluation sets
# ---------------------------------------------------------------------------------------------
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
        rng = _rng("scenes-pool", self.seed, self.name)
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

    def _items(self) -> Iterator[tuple[int, random.Random, _TaskItem]]:
        for q in range(self.n_queries):
            rng = _rng("scenes-eval", self.seed, self.name, q)
            yield q, rng, _make_item(self.task, rng, self.split, seed=f"{self.seed}:{self.name}:{q}")

    def _rec(self, item: _TaskItem, q: int, qry_image: ImageRef | None, texts: list[str],
             images: list[ImageRef | None], **meta: Any) -> EvalRecord:
        m = {"task": item.task, "scene": item.scene.to_dict(), "index": q, "n_candidates": len(texts), **meta}
        if item.target is not None:
            m["target"] = item.target
        if item.qtype:
            m["qtype"], m["answer_type"] = item.qtype, item.answer_type
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
    names = datasets or list(DATASETS)
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise RecordError(f"unknown scenes dataset(s) {unknown}; known: {', '.join(DATASETS)}")
    for name in names:
        yield from _EvalBuilder(name, eval_per_task, n_distractors, seed, image_size, store or _embed_store, n_hard).records()


# ---------------------------------------------------------------------------------------------
# materialising
# ---------------------------------------------------------------------------------------------
class _DirStore:
    """Content-addressed image files under ``<dataset dir>/images/<xx>/<digest>.png``."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        self.dirs = dirs
        self.written: Counter[str] = Counter()
        self._seen: set[tuple[str, str]] = set()

    def __call__(self, dataset: str, data: bytes) -> ImageRef:
        h = digest(data)
        rel = f"images/{h[:2]}/{h}.png"
        if (dataset, h) not in self._seen:
            self._seen.add((dataset, h))
            f = self.dirs[dataset] / rel
            if not f.exists():
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_bytes(data)
                self.written[dataset] += 1
        return ImageRef(path=rel)


Progress = Callable[[str, int, int], None]


def build_benchmark(
    root: str | Path, n_train: int = 20000, eval_per_task: int = 200, n_distractors: int = 999, seed: int = 0,
    *, image_size: int = 112, datasets: list[str] | None = None, overwrite: bool = False,
    progress: Progress | None = None, shard_rows: int = 5000,
) -> dict[str, Any]:
    """Write ``root/original`` (PairRecord shards) and ``root/eval/<Dataset>/`` (EvalRecord shards +
    ``images/``) and ``root/benchmark.json``; return the summary (also written there).

    Each directory is built under a temporary name and moved into place when complete, so an
    interrupted build never leaves a directory a reader would take for a finished one.
    """
    if image_size < 28:
        raise RecordError(f"image_size {image_size} is too small; use at least 28 (one 14-px patch pair)")
    if n_train < 0 or eval_per_task < 0 or n_distractors < 1:
        raise RecordError("n_train and eval_per_task must be >= 0 and n_distractors >= 1")
    root = Path(root)
    names = datasets or list(DATASETS)
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise RecordError(f"unknown scenes dataset(s) {unknown}; known: {', '.join(DATASETS)}")
    targets = [root / "original"] + [root / "eval" / n for n in names]
    existing = [p for p in targets if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        raise RecordError(f"{existing[0]} already exists; pass overwrite=True (--overwrite) or choose another --out")
    for p in existing:  # refuse before building anything: --overwrite replaces only cocoa's own datasets
        if p.is_symlink() or not p.is_dir() or (has_content(p) and not is_owned(p)):
            raise NotOwnedError(f"{p} exists and was not made by cocoa (no cocoa manifest or marker); --overwrite only "
                                "replaces cocoa's own output. Remove it yourself if you mean it, or choose another --out")
    if root.exists() and not root.is_dir():
        raise RecordError(f"--out {root} is a file, not a directory; choose a directory for the benchmark")
    fresh = not root.exists() or (root.is_dir() and not has_content(root))
    with exclusive_lock(root, name=".cocoa-scenes.lock", what="it is building a scenes benchmark there;"):
        if fresh:
            mark_owned(root, "workspace")
        return _build(root, names, n_train, eval_per_task, n_distractors, seed, image_size, progress, shard_rows)


def _build(root: Path, names: list[str], n_train: int, eval_per_task: int, n_distractors: int, seed: int,
           image_size: int, progress: Progress | None, shard_rows: int) -> dict[str, Any]:
    from ..shards import ShardWriter, atomic_write_json

    (root / "eval").mkdir(parents=True, exist_ok=True)
    prog = progress or (lambda stage, done, total: None)

    def tmp_for(p: Path) -> Path:
        t = p.with_name(f".{p.name}.tmp")
        remove_owned_tree(t, flag="a rebuild")  # an interrupted build's own leftover (cocoa-made) only
        return t

    def swap(tmp: Path, final: Path) -> None:
        remove_owned_tree(final, flag="--overwrite")
        tmp.rename(final)

    params = {"n_train": n_train, "eval_per_task": eval_per_task, "n_distractors": n_distractors, "seed": seed,
              "image_size": image_size}
    prov = {"source": "scenes", **params, "held_out_combos": sorted(map(list, HELD_OUT_COMBOS))}
    summary: dict[str, Any] = {"root": str(root), **params, "held_out_combos": prov["held_out_combos"],
                               "train": {}, "eval": {}}

    # training pairs
    tmp = tmp_for(root / "original")
    counts: Counter[str] = Counter()
    with ShardWriter(tmp, "PairRecord", max_rows=shard_rows, provenance=prov) as w:
        for k, rec in enumerate(iter_train_pairs(n_train, seed, image_size=image_size)):
            w.write(rec)
            counts[rec.meta["task"]] += 1
            if (k + 1) % 50 == 0 or k + 1 == n_train:
                prog("train", k + 1, n_train)
    swap(tmp, root / "original")
    summary["train"] = {"rows": n_train, "tasks": dict(sorted(counts.items()))}

    # evaluation sets
    for name in names:
        final = root / "eval" / name
        tmp = tmp_for(final)
        tmp.mkdir(parents=True)
        store = _DirStore({name: tmp})
        info = DATASETS[name]
        n_cand: list[int] = []
        with ShardWriter(tmp, "EvalRecord", max_rows=max(1, min(shard_rows, 200_000 // max(1, n_distractors))),
                         provenance={**prov, "dataset": name, **info}) as w:
            for k, rec in enumerate(iter_eval_sets(eval_per_task, n_distractors, seed, image_size=image_size,
                                                   datasets=[name], store=store)):
                w.write(rec)
                n_cand.append(len(rec.tgt_texts))
                prog(name, k + 1, eval_per_task)
        swap(tmp, final)
        summary["eval"][name] = {
            "meta_task": info["meta_task"], "split": info["split"], "queries": len(n_cand),
            "candidates": max(n_cand) if n_cand else 0, "images": store.written[name],
        }
    atomic_write_json(root / "benchmark.json", summary)
    return summary


def contact_sheet(seed: int = 0, n: int = 24, image_size: int = 112, cols: int = 6):  # type: ignore[no-untyped-def]
    """A labelled grid as a PIL image: the first ``n`` training pairs (rendered scene x2, task and
    coarse text; grounding shows its crop in the corner), then one query from three evaluation sets
    with its first candidates (positive framed green, hard negatives red)."""
    from PIL import Image, ImageDraw

    Z = 2  # upscale factor for legibility
    pad, text_h = 4, 46
    tw, th = image_size * Z + 2 * pad, image_size * Z + text_h + 2 * pad
    rows = (n + cols - 1) // cols
    eval_h = 3 * (th + 20)
    sheet = Image.new("RGB", (cols * tw, rows * th + eval_h), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    font = _font(12)

    def tile(img, x: int, y: int, frame: tuple[int, int, int] | None = None) -> None:  # type: ignore[no-untyped-def]
        big = img.resize((image_size * Z, image_size * Z), Image.Resampling.NEAREST)  # crops are upscaled more
        sheet.paste(big, (x + pad, y + pad))
        if frame:
            d.rectangle([x + pad - 2, y + pad - 2, x + pad + image_size * Z + 1, y + pad + image_size * Z + 1],
                        outline=frame, width=3)

    def caption(x: int, y: int, first: str, second: str) -> None:
        d.text((x + pad, y + pad + image_size * Z + 2), first[:38], fill=(90, 90, 90), font=font)
        d.text((x + pad, y + pad + image_size * Z + 17), second[:38], fill=(0, 0, 0), font=font)
        d.text((x + pad, y + pad + image_size * Z + 31), second[38:76], fill=(0, 0, 0), font=font)

    for k, rec in enumerate(iter_train_pairs(n, seed, image_size=image_size)):
        x, y = (k % cols) * tw, (k // cols) * th
        tile((rec.qry_image or rec.pos_image).load(), x, y)  # type: ignore[union-attr]
        task = rec.meta["task"]
        if task == "grounding" and rec.pos_image is not None:
            crop = rec.pos_image.load()
            sheet.paste(crop, (x + pad + image_size * Z - crop.size[0], y + pad + image_size * Z - crop.size[1]))
        if task == "vqa":
            text = rec.qry_text.split("question: ")[-1] + " -> " + rec.pos_text
        elif task in ("retrieval_t2i", "grounding"):
            text = rec.qry_text.split(": ")[-1]
        else:
            text = rec.pos_text
        caption(x, y, f"train {task} {rec.meta.get('qtype', '')}", text)

    y0 = rows * th
    for r, name in enumerate(("SceneT2I-OOD", "SceneGround", "SceneVQA-OOD")):
        rec = next(iter_eval_sets(1, cols - 1, seed, image_size=image_size, datasets=[name]))
        y = y0 + r * (th + 20)
        query = rec.qry_text.split(": ", 1)[-1].replace(IMG, "").strip()
        d.text((pad, y + 2), f"eval {name}: {query}"[:150], fill=(0, 0, 120), font=font)
        y += 18
        if name == "SceneVQA-OOD":
            tile(rec.qry_image.load(), 0, y)  # type: ignore[union-attr]
            for j, t in enumerate(rec.tgt_texts[: cols - 1]):
                d.text((tw + pad, y + pad + 20 * j), ("+ " if j == 0 else "- ") + t,
                       fill=(0, 130, 0) if j == 0 else (170, 0, 0), font=font)
            continue
        for j, ref in enumerate(rec.tgt_images[:cols]):
            tile(ref.load(), j * tw, y, (0, 170, 0) if j == 0 else (200, 40, 40))  # type: ignore[union-attr]
            if name == "SceneGround" and j == 0 and rec.qry_image is not None:
                q = rec.qry_image.load().resize((image_size // 2 * Z, image_size // 2 * Z))
                sheet.paste(q, (tw - pad - q.size[0], y + th - text_h - q.size[1]))
        d.text((pad, y + pad + image_size * Z + 4), "green = positive (candidate 0), red = distractors, hard ones first",
               fill=(90, 90, 90), font=font)
    return sheet


def write_contact_sheet(path: str | Path, seed: int = 0, n: int = 24, image_size: int = 112) -> Path:
    from ..shards import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, png_bytes(contact_sheet(seed, n, image_size)))
    return path


def load_eval_hf(dataset_dir: str | Path):  # type: ignore[no-untyped-def]
    """An evaluation dataset directory through Hugging Face ``datasets``, with image paths made
    absolute so that ``Image`` features decode from any working directory.

    (``open_dataset(dir).to_hf()`` opens the same records; its path-only images decode relative to
    the current directory, as ``datasets.Image`` does for any relative path.)"""
    import datasets

    from ..shards import open_dataset

    dataset_dir = Path(dataset_dir).resolve()
    ds = open_dataset(dataset_dir).to_hf()
    raw = datasets.Image(decode=False)
    ds = ds.cast_column("qry_image", raw).cast_column("tgt_images", datasets.List(raw))

    def absolute(im: dict[str, Any] | None) -> dict[str, Any] | None:
        if im is None or im.get("bytes") is not None or not im.get("path"):
            return im
        return {"bytes": None, "path": str(ImageRef(path=im["path"]).resolve(dataset_dir))}

    ds = ds.map(lambda r: {"qry_image": absolute(r["qry_image"]), "tgt_images": [absolute(x) for x in r["tgt_images"]]},
                desc=None)
    img = datasets.Image()
    return ds.cast_column("qry_image", img).cast_column("tgt_images", datasets.List(img))


def scene_of(record: PairRecord | EvalRecord) -> Scene:
    """The scene graph stored in a record's ``meta["scene"]``."""
    if "scene" not in record.meta:
        raise RecordError(f"record {record.id} has no meta['scene'] (it is not a scenes record)")
    return Scene.from_dict(record.meta["scene"])
