"""The scenes' fixed tables: object attributes, held-out combinations, datasets and tasks, MMEB-style
instructions, VQA question templates and answer sets."""

from __future__ import annotations

from ...records import RecordError

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


def dataset_names(datasets: list[str] | None) -> list[str]:
    """The scenes datasets asked for (all of :data:`DATASETS` for none), refusing unknown names."""
    names = datasets or list(DATASETS)
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise RecordError(f"unknown scenes dataset(s) {unknown}; known: {', '.join(DATASETS)}")
    return names


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
