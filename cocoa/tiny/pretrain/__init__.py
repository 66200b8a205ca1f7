"""Generative pre-training of the tiny model: causal attention, next-token prediction on the scenes.

The paper starts from a generatively pre-trained MLLM (Qwen2-VL), so the experiments here start from a
tiny Qwen2-VL trained the way Qwen2-VL was: an image (+ an instruction or question) is the prompt, the
answer / label / caption is the response, and the loss is taken on the response tokens only.

Examples come from ``PairRecord`` shards (``DATA/original`` or a dataset directory):

* every record whose query has an image and whose positive is text (classification, VQA, image ->
  caption): prompt = the query (``<|image_1|>`` replaced by the image block), response = ``pos_text``;
* every record with a scene graph in ``meta["scene"]``: the scene image -> a detailed caption (counts,
  sizes, materials, positions, printed text, relations), and for grounding records (``meta["target"]``)
  the query -> a description of the referred object and where it is.

Sequences use cocoa's plain layout (docs/design.md): ``<|vision_start|><|image_pad|>…<|vision_end|>``
prompt ``\\n`` response ``<|endoftext|>``; the processor expands the image pads.

:func:`pretrain` trains and saves (``save_pretrained`` + ``cocoa.json`` with ``stages: []`` and
``extra["pretrained"] = "generative"``); :func:`pretrained_tiny_dir` returns a cached build keyed by the
data manifest checksums and the settings, so the demo and the ablation build it once.

The package: :mod:`.config` (settings, file names, version), :mod:`.examples` (records -> examples, the
captions from scene graphs), :mod:`.data` (which records, their cache key), :mod:`.batches` (model inputs,
the response loss), :mod:`.run` (:func:`pretrain`, :func:`image_gap`), :mod:`.cache`
(:func:`pretrained_tiny_dir`), :mod:`.metrics` (the per-step logs).
"""

from __future__ import annotations

from .batches import _Batcher, _length_grouped_batches, response_loss
from .cache import cache_key, pretrained_tiny_dir
from .config import ALIGN_METRICS_FILE, DEFAULT_STEPS, METRICS_FILE, PRETRAIN_VERSION, PretrainConfig
from .data import data_key, load_records
from .examples import (CAPTION_PROMPTS, COUNT_PROMPT, IMAGE_PLACEHOLDER, OBJECTS_PROMPT, SHORT_CHARS, SHORT_KINDS,
                       Example, describe_objects, describe_scene, describe_target, examples_from_record,
                       heldout_examples, image_block, prompt_text, reading_order)
from .metrics import loss_curve, read_metrics
from .run import image_gap, pretrain

__all__ = ["PretrainConfig", "pretrain", "pretrained_tiny_dir", "describe_scene", "examples_from_record",
           "image_gap", "heldout_examples", "reading_order",
           "loss_curve", "read_metrics", "data_key", "load_records",
           "ALIGN_METRICS_FILE", "CAPTION_PROMPTS", "COUNT_PROMPT", "DEFAULT_STEPS", "Example", "IMAGE_PLACEHOLDER",
           "METRICS_FILE", "OBJECTS_PROMPT", "PRETRAIN_VERSION", "SHORT_CHARS", "SHORT_KINDS", "cache_key",
           "describe_objects", "describe_target", "image_block", "prompt_text", "response_loss"]
