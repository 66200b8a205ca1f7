"""MMEB as published: repo ids, columns, splits, the expected-layout texts, :class:`MMEBError`, and
the table of the 36 MMEB-V1 evaluation datasets (package data ``mmeb_v1.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Literal

from ...errors import CocoaError

TRAIN_REPO = "TIGER-Lab/MMEB-train"
EVAL_REPO = "TIGER-Lab/MMEB-eval"
IMAGE_PLACEHOLDER = "<|image_1|>"
TRAIN_COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path")
TRAIN_OPTIONAL = ("neg_text", "neg_image_path")
EVAL_COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
TRAIN_SPLITS = ("original", "diverse_instruction", "train")

TRAIN_LAYOUT = (
    "ROOT/<Subset>/<split>-*.parquet (splits original / diverse_instruction, or train) with columns "
    "qry, qry_image_path, pos_text, pos_image_path [neg_text, neg_image_path], and images in "
    "ROOT/images_zip/<Subset>.zip (members images/<Subset>/...) or an extracted --image-dir; "
    f"e.g. `git clone https://huggingface.co/datasets/{TRAIN_REPO}` on a machine with network, then copy it here"
)
EVAL_LAYOUT = (
    "ROOT/<Dataset>/test-*.parquet with columns qry_text, qry_img_path, tgt_text (list), tgt_img_path (list), "
    "and images in ROOT/images.zip or ROOT/eval_images/ (or --image-dir); "
    f"e.g. `git clone https://huggingface.co/datasets/{EVAL_REPO}` on a machine with network, then copy it here"
)


class MMEBError(CocoaError):
    """An MMEB source cannot be read as given; the message names the file and the expected layout."""


# ---------------------------------------------------------------------------------------------
# the 36 MMEB-V1 evaluation datasets (package data)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MMEBDataset:
    name: str
    meta_task: Literal["classification", "vqa", "retrieval", "grounding"]
    split: Literal["IND", "OOD"]
    train_subset: str | None = None


@lru_cache(maxsize=1)
def mmeb_v1_datasets() -> tuple[MMEBDataset, ...]:
    """The 36 MMEB-V1 eval datasets with meta-task and IND/OOD (from ``mmeb_v1.yaml``)."""
    import yaml

    text = resources.files(__package__).joinpath("mmeb_v1.yaml").read_text()
    return tuple(MMEBDataset(**d) for d in yaml.safe_load(text)["datasets"])


def mmeb_v1_by_name() -> dict[str, MMEBDataset]:
    return {d.name: d for d in mmeb_v1_datasets()}


def mmeb_train_subsets() -> list[str]:
    """The 20 MMEB-train subsets (the IND datasets' training configs)."""
    return [d.train_subset for d in mmeb_v1_datasets() if d.train_subset]
