"""How a scene graph is said in English: the one place for the phrases every scenes text is built from.

An indefinite article, a list joined with "and", a count ("two red cubes"), an object's attributes
("large metallic red cube with 'K' printed on it"), where an object lies in the image ("at the top left"),
and which third of the image (top / middle / bottom band) it is in. Three parts of cocoa write scenes
text with them:

* the scenes source (:mod:`cocoa.sources.scenes`): coarse captions, :meth:`SceneObject.describe`;
* the scenes teacher (:mod:`cocoa.datagen.teachers.scenes`): fine-grained captions and QA;
* the tiny backbone's generative pre-training (:mod:`cocoa.tiny.pretrain`): detailed captions, objects in
  reading order, grounding descriptions.

What each caller composes (which sentences, in which order) stays with the caller; how an object and its
position are said is decided here, by a :class:`Wording` that each caller passes explicitly. There are two:

==================  ==========================================  ==============================
                    :data:`TEACHER`                             :data:`PRETRAIN`
==================  ==========================================  ==============================
left / top third    centre below 0.36 (right / bottom: > 0.64)  below 0.37 (> 0.63)
middle of the image "in the centre" (British)                   "in the center" (American)
printed character   "with the character 'K' printed on it"      "with 'K' printed on it"
==================  ==========================================  ==============================

(:meth:`SceneObject.describe` has always said an object the PRETRAIN way.)

The two presets exist only for byte-compatibility of cached data and models; they are what the teacher
and the pre-training wrote before they shared this module. Merging them into one wording would change
(1) the teacher's captions and answers (every "centre", every "the character", objects whose centre lies
between 0.36 and 0.37 or 0.63 and 0.64), so synthesized shards would no longer match those already made by
scenes-teacher revision "1" (bump that revision); and (2) the pre-training captions, object order
(:func:`band`) and grounding descriptions, so the cached pre-trained tiny model would be trained on other
text (bump ``PRETRAIN_VERSION``) and the demo's numbers would move. Merge them only with those bumps.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Wording:
    """How positions and printed characters are phrased (see the module docstring for why there are two)."""

    name: str
    low: float  # a centre below this fraction of the image is left (x) / top (y)
    high: float  # above this: right / bottom; in between: the middle
    centre: str  # the word for the middle of the image: "in the <centre>"
    printed: str  # an object's printed character; ``{text}`` is the character


TEACHER = Wording("teacher", low=0.36, high=0.64, centre="centre", printed="with the character '{text}' printed on it")
PRETRAIN = Wording("pretrain", low=0.37, high=0.63, centre="center", printed="with '{text}' printed on it")

COUNT_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def article(phrase: str) -> str:
    """``"a red cube"``, ``"an orange ring"``."""
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def join(items: list[str]) -> str:
    """``"x"``, ``"x and y"``, ``"x, y and z"`` (``""`` for none)."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def plural(noun: str, n: int) -> str:
    return noun if n == 1 else noun + "s"


def count_phrase(n: int, noun: str) -> str:
    """``"no objects"``, ``"one red cube"``, ``"two spheres"``, ``"12 rings"``."""
    return f"{COUNT_WORDS[n] if n < len(COUNT_WORDS) else n} {plural(noun, n)}"


def object_phrase(size: str, material: str, color: str, shape: str, text: str | None, wording: Wording) -> str:
    """An object with every attribute: ``"large metallic red cube"`` + the printed character, if any."""
    s = f"{size} {material} {color} {shape}"
    if text:
        s += " " + wording.printed.format(text=text)
    return s


def where(x: float, y: float, wording: Wording) -> str:
    """Where a centre at ``(x, y)`` (fractions of the image) lies: ``"at the top left"``, ``"on the right"``,
    ``"at the bottom"``, ``"in the centre"``."""
    h = "left" if x < wording.low else "right" if x > wording.high else ""
    v = "top" if y < wording.low else "bottom" if y > wording.high else ""
    if not h and not v:
        return f"in the {wording.centre}"
    if h and v:
        return f"at the {v} {h}"
    return f"on the {h}" if h else f"at the {v}"


def band(y: float, wording: Wording) -> int:
    """The horizontal third a centre at height ``y`` lies in: 0 top, 1 middle, 2 bottom."""
    return 0 if y < wording.low else 2 if y > wording.high else 1
