"""Readers for MMEB-train and MMEB-eval (TIGER-Lab, VLM2Vec / MMEB-V1), exactly as published.

Layouts read (a local snapshot / git clone of the dataset repo, or the hub when online):

MMEB-train (``TIGER-Lab/MMEB-train``)::

    ROOT/<Subset>/original-00000-of-00001.parquet            one config per subset (underscore names:
    ROOT/<Subset>/diverse_instruction-00000-of-00001.parquet  ImageNet_1K, MSCOCO_t2i, ...); older copies
    ROOT/<Subset>/train-00000-of-00001.parquet                have a single split named ``train``
    ROOT/images_zip/<Subset>.zip                              members images/<Subset>/...

    columns: qry, qry_image_path, pos_text, pos_image_path [, neg_text, neg_image_path]

MMEB-eval (``TIGER-Lab/MMEB-eval``)::

    ROOT/<Dataset>/test-00000-of-00001.parquet               one config per dataset (ImageNet-1K, ...)
    ROOT/images.zip  or  ROOT/eval_images/<Dataset>/...      the images

    columns: qry_text, qry_img_path, tgt_text (list), tgt_img_path (list, "" for text candidates)

Images are read straight from the zips (never extracted) or from an extracted ``image_dir``; a
path is looked up as written and with/without its leading ``images/`` (both unzip conventions
exist in the wild). Texts keep MMEB's Phi-3 placeholder ``<|image_1|>``: the collator swaps it for
the backbone's image tokens. Rows with a bad image (missing member, corrupt file, ``..`` path,
decompression bomb) are skipped *and counted*, each as a :class:`~cocoa.records.QuarantineRecord`
(``stage="source"``) in the :class:`SourceReport` (``on_error="raise"`` stops instead). Structural
problems (missing column, unknown subset, no data) raise :class:`MMEBError` naming the fix.

Modules: :mod:`.layout` (names, columns, layouts, the MMEB-V1 table), :mod:`.report` (what a read
did), :mod:`.images` (image zips and directories), :mod:`.rows` (locating and decoding raw rows),
:mod:`.read_train` / :mod:`.read_eval` (the readers), :mod:`.write` (as cocoa shards).
"""

from .images import ImageSource, image_bytes_checked
from .layout import (
    EVAL_COLUMNS,
    EVAL_LAYOUT,
    EVAL_REPO,
    IMAGE_PLACEHOLDER,
    TRAIN_COLUMNS,
    TRAIN_LAYOUT,
    TRAIN_OPTIONAL,
    TRAIN_REPO,
    TRAIN_SPLITS,
    MMEBDataset,
    MMEBError,
    mmeb_train_subsets,
    mmeb_v1_by_name,
    mmeb_v1_datasets,
)
from .read_eval import ImageStore, iter_mmeb_eval
from .read_train import iter_mmeb_train
from .report import SourceReport
from .rows import decode_row
from .write import write_mmeb_eval, write_mmeb_train

__all__ = [
    "EVAL_COLUMNS", "EVAL_LAYOUT", "EVAL_REPO", "IMAGE_PLACEHOLDER", "TRAIN_COLUMNS", "TRAIN_LAYOUT", "TRAIN_OPTIONAL",
    "TRAIN_REPO", "TRAIN_SPLITS", "ImageSource", "ImageStore", "MMEBDataset", "MMEBError", "SourceReport",
    "decode_row", "image_bytes_checked", "iter_mmeb_eval", "iter_mmeb_train", "mmeb_train_subsets", "mmeb_v1_by_name",
    "mmeb_v1_datasets", "write_mmeb_eval", "write_mmeb_train",
]
