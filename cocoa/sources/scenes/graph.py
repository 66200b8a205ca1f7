"""The scene graph: objects with their attributes and positions, derived facts (counts, relations,
referring expressions, coarse captions) and seeded sampling of scenes."""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass
from typing import Any

from ...records import EvalRecord, PairRecord, RecordError
from .english import PRETRAIN, article, join, object_phrase
from .vocab import CAPTION_TEMPLATES, COLOR_NAMES, HELD_OUT_COMBOS, MATERIALS, MAX_OBJECTS, SHAPES, SIZES, TEXTS

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
        return object_phrase(self.size, self.material, self.color, self.shape, self.text, PRETRAIN)


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
        return template.format(x=join([article(lab) for lab in labels]))

    def caption_key(self) -> frozenset[str]:
        return frozenset(o.label for o in self.objects)


def keyed_rng(*parts: Any) -> random.Random:
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


def scene_of(record: PairRecord | EvalRecord) -> Scene:
    """The scene graph stored in a record's ``meta["scene"]``."""
    if "scene" not in record.meta:
        raise RecordError(f"record {record.id} has no meta['scene'] (it is not a scenes record)")
    return Scene.from_dict(record.meta["scene"])
