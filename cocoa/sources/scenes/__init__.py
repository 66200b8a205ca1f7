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

The package, one module per job: :mod:`.vocab` (attributes, datasets, instructions, question templates),
:mod:`.english` (how a scene graph is said in English, for the source, the teacher and pre-training),
:mod:`.graph` (:class:`Scene`, sampling), :mod:`.render` (drawing, crops, PNG), :mod:`.tasks` (task
instances, training pairs), :mod:`.evalsets` (evaluation sets), :mod:`.benchmark` (writing the benchmark,
reading it through ``datasets``), :mod:`.sheet` (a contact sheet to look at it).
"""

from __future__ import annotations

from .benchmark import Progress, build_benchmark, load_eval_hf
from .evalsets import ImageStore, iter_eval_sets
from .graph import REL_MARGIN, Scene, SceneObject, sample_scene, scene_of
from .render import SUPERSAMPLE, crop_object, crop_size_for, png_bytes, render_scene
from .sheet import contact_sheet, write_contact_sheet
from .tasks import iter_train_pairs
from .vocab import (ALL_LABELS, ANSWER_TYPES, ANSWERS_BY_TYPE, CAPTION_TEMPLATES, COLOR_NAMES, COLORS, DATASETS,
                    HELD_OUT_COMBOS, IMG, IND_DATASETS, MATERIALS, MAX_OBJECTS, NUMBER_WORDS, PROMPTS, QUESTIONS, SHAPES,
                    SIZES, TARGET_CROP_TEXT, TARGET_IMAGE_TEXT, TASKS, TEXTS, TRAIN_SOURCE)

__all__ = [
    "ALL_LABELS", "ANSWER_TYPES", "ANSWERS_BY_TYPE", "CAPTION_TEMPLATES", "COLOR_NAMES", "COLORS", "DATASETS",
    "HELD_OUT_COMBOS", "IMG", "IND_DATASETS", "MATERIALS", "MAX_OBJECTS", "NUMBER_WORDS", "PROMPTS", "QUESTIONS",
    "REL_MARGIN", "SHAPES", "SIZES", "SUPERSAMPLE", "TARGET_CROP_TEXT", "TARGET_IMAGE_TEXT", "TASKS", "TEXTS",
    "TRAIN_SOURCE", "ImageStore", "Progress", "Scene", "SceneObject", "build_benchmark", "contact_sheet", "crop_object",
    "crop_size_for", "iter_eval_sets", "iter_train_pairs", "load_eval_hf", "png_bytes", "render_scene", "sample_scene",
    "scene_of", "write_contact_sheet",
]
