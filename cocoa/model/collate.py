"""Collators: training records -> padded model inputs for each CoCoA stage, through the model's processor.

Sequences are plain text (no chat template). An image is the block
``<|vision_start|><|image_pad|><|vision_end|>``, expanded by the processor to one ``<|image_pad|>`` per
LLM image token. MMEB's Phi-3 placeholder ``<|image_1|>`` is replaced by that block; a text with an image
but no placeholder gets the block first.

* :class:`Stage1Collator`: ``image block + (prompt + " " + text).strip()``, bidirectional; 20 % of text
  tokens masked for MNTP, 50 % of the image's merge units masked for MAE.
* :class:`Stage2Collator`: ``[A: image block + prompt] EOS [B: text]``; 70 % of B masked.
* :class:`EmbedCollator`: ``(text, image)`` items (optional instruction), EOS appended; stage-3 queries and
  targets and the evaluator.

Every batch is a dict of tensors (see :data:`BATCH_KEYS`)::

    input_ids [B, L]        attention_mask [B, L] (1 = real)   mm_token_type_ids [B, L] (1 = image token)
    eos_pos [B]             absolute index of the EOS token (-1: none, stage 1)
    pixel_values [N, 1176]  image_grid_thw [n_images, 3]       (only when the batch has images)
    labels [B, L]           stages 1/2: original ids at masked text positions, -100 elsewhere
    image_unit_mask [units] stage 1: True for MAE-masked merge units (aligned with the image tokens)
    pixel_values_clean [N, 1176]  stage 1: the uncorrupted pixels (MAE targets)

Truncation never cuts through image tokens: text is trimmed from the end (B first in stage 2); a
training sample that cannot fit its image is rejected, counted in ``collator.stats`` and logged. An
embedding item that cannot fit raises :class:`CollateError` (evaluation must not drop items).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from ..records import ImageRef
from .objectives import IGNORE, mask_image_units, mask_text_tokens
from .spec import EmbeddingSpec
from ..errors import CocoaError

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<|image_1|>"
MAX_ASPECT_RATIO = 200  # the Qwen2-VL image processor refuses an image whose long side / short side exceeds this
# Qwen2-VL's special tokens (and cocoa's <|mask|>): user text holding one would be read as markup (an image
# block without pixels, a fake EOS or mask), so text containing any of them is refused, row by row.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<|mask|>",
)
IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
BATCH_KEYS = (
    "input_ids", "attention_mask", "mm_token_type_ids", "eos_pos", "pixel_values", "image_grid_thw",
    "labels", "image_unit_mask", "pixel_values_clean",
)


class CollateError(CocoaError):
    """A sample or setting the collator cannot turn into model inputs (message says what to change)."""


def render_text(text: str, has_image: bool) -> str:
    """Replace MMEB's ``<|image_1|>`` with the Qwen image block; prepend the block when an image has no
    placeholder; drop a placeholder that has no image."""
    text = text or ""
    if has_image:
        if IMAGE_PLACEHOLDER in text:
            first, rest = text.split(IMAGE_PLACEHOLDER, 1)
            return first + IMAGE_BLOCK + rest.replace(IMAGE_PLACEHOLDER, "")
        return IMAGE_BLOCK + text
    return text.replace(IMAGE_PLACEHOLDER, "").strip()


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def missing_tokenizer_files(model_dir: Any) -> str | None:
    """A message when ``model_dir`` is a directory without any tokenizer file, else ``None``."""
    from pathlib import Path

    if not model_dir:
        return None
    d = Path(model_dir)
    if not d.is_dir() or any((d / f).is_file() for f in TOKENIZER_FILES):
        return None
    return (f"{d} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}; tokenizer_config.json belongs with "
            "them): copy them back from the model this one was made from, or re-save the model with cocoa-train")


def check_image_size(size: Any, where: str = "image") -> None:
    """:class:`CollateError` for an image the Qwen2-VL processor cannot resize (aspect ratio above
    :data:`MAX_ASPECT_RATIO`, or a zero side); ``size`` is ``(w, h)``. ``None`` (unknown) passes."""
    if not size:
        return
    w, h = int(size[0]), int(size[1])
    if min(w, h) < 1 or max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        ratio = f"{max(w, h) / min(w, h):.0f}:1" if min(w, h) >= 1 else "a zero side"
        raise CollateError(f"{where} is {w}x{h} pixels (aspect ratio {ratio}); the Qwen2-VL processor takes at most "
                           f"{MAX_ASPECT_RATIO}:1 -- crop or pad the image, or drop the row")


def special_token_in(text: str | None, tokens: Iterable[str] = SPECIAL_TOKENS) -> str | None:
    """The first special token found in ``text`` (``None`` when there is none)."""
    if not text or "<" not in text:
        return None
    found = [(text.find(tok), tok) for tok in tokens if tok and tok in text]
    return min(found)[1] if found else None  # the first one in the text


def check_text(text: str | None, where: str = "text", tokens: Iterable[str] = SPECIAL_TOKENS) -> None:
    """:class:`CollateError` naming the special token when ``text`` holds one (see :data:`SPECIAL_TOKENS`)."""
    tok = special_token_in(text, tokens)
    if tok is not None:
        raise CollateError(f"{where} contains the special token {tok!r}, which the model would read as markup, not "
                           "text; remove it from the data (MMEB's image placeholder is <|image_1|>)")


def load_image(image: Any, root: Any = None, where: str = "image") -> Any:
    """An RGB PIL image from an :class:`ImageRef` (embedded or relative to ``root``) or a PIL image.
    An image the processor cannot take (:func:`check_image_size`) raises :class:`CollateError`."""
    if image is None:
        return None
    if isinstance(image, ImageRef):
        im = image.load(root)
    elif hasattr(image, "convert"):
        im = image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image
    else:
        raise CollateError(f"unsupported image value {type(image).__name__}; pass an ImageRef or a PIL image")
    size = getattr(im, "size", None)
    check_image_size(size if isinstance(size, tuple) else None, where)
    return im


@dataclass
class _Sample:
    ids: list[int]
    eos: int = -1  # relative index of EOS (-1 none)
    maskable: list[bool] = field(default_factory=list)
    pixel_values: torch.Tensor | None = None
    grid: torch.Tensor | None = None


class _Base:
    """Shared machinery: token ids, image processing, truncation policy, padding."""

    def __init__(
        self,
        processor: Any,
        spec: EmbeddingSpec | None = None,
        max_length: int | None = None,
        image_root: Any = None,
        padding_side: str = "right",
        seed: int = 0,
    ) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.spec = spec or EmbeddingSpec()
        self.max_length = int(max_length or self.spec.max_length)
        self.image_root = image_root
        if padding_side not in ("left", "right"):
            raise CollateError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.padding_side = padding_side
        self.generator = torch.Generator().manual_seed(seed)
        self.stats: Counter = Counter()
        tok = self.tokenizer
        self.image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
        self.vision_start_id = tok.convert_tokens_to_ids("<|vision_start|>")
        self.vision_end_id = tok.convert_tokens_to_ids("<|vision_end|>")
        self.eos_token_id = self._token_id(self.spec.eos_token, self.spec.eos_token_id, "EOS")
        self.mask_token_id = self._token_id(self.spec.mask_token, self.spec.mask_token_id, "mask")
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_token_id
        added = getattr(tok, "added_tokens_decoder", {}) or {}
        self.special_tokens = tuple(dict.fromkeys(
            [*SPECIAL_TOKENS, self.spec.eos_token, self.spec.mask_token,
             *(a.content for a in added.values() if getattr(a, "special", False) and getattr(a, "content", ""))]))
        self.special_ids = set(tok.all_special_ids) | {
            self.image_token_id, self.vision_start_id, self.vision_end_id, self.eos_token_id, self.mask_token_id,
        }
        ip = processor.image_processor
        self.merge_size = int(getattr(ip, "merge_size", 2))
        self.patch_size = int(getattr(ip, "patch_size", 14))
        min_pixels = self.spec.image_min_pixels or _size_get(ip, "shortest_edge", "min_pixels") or 56 * 56
        unit = (self.patch_size * self.merge_size) ** 2
        self.min_image_tokens = max(1, math.ceil(min_pixels / unit))
        need = self.min_image_tokens + 2 + 1  # vision start/end + EOS
        if self.max_length < need:
            raise CollateError(
                f"max_length={self.max_length} is too small for one image: the smallest image this processor "
                f"produces takes {self.min_image_tokens} image tokens + 2 vision markers + EOS = {need} tokens; "
                f"raise max_length (the paper's setups use >= 512)"
            )

    def _token_id(self, token: str, expected: int | None, what: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id:
            missing = missing_tokenizer_files(getattr(self.tokenizer, "name_or_path", ""))
            if missing:
                raise CollateError(missing)
            raise CollateError(
                f"the {what} token {token!r} is not in the tokenizer; load the model with CocoaModel.from_pretrained "
                "(it adds <|mask|>) or fix eos_token/mask_token in cocoa.json"
            )
        if expected is not None and tid != expected:
            raise CollateError(f"the {what} token {token!r} has id {tid} but cocoa.json records {expected}")
        return int(tid)

    # -- encoding ---------------------------------------------------------------------------------
    def encode(self, text: str, image: Any) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
        """Token ids (image block expanded by the processor), pixel_values, image_grid_thw."""
        if image is None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return list(ids), None, None
        out = self.processor(text=[text], images=[image], return_tensors="pt")
        return out["input_ids"][0].tolist(), out["pixel_values"], out["image_grid_thw"]

    def check_text(self, text: str | None, where: str) -> None:
        """:class:`CollateError` when user text holds one of the tokenizer's special tokens."""
        check_text(text, where, self.special_tokens)

    def check_record(self, record: Any) -> None:
        """Every text field of a training record checked (:meth:`check_text`), naming the record and field."""
        for name in ("prompt", "text", "qry_text", "pos_text", "neg_text"):
            v = getattr(record, name, None)
            if isinstance(v, str):
                self.check_text(v, f"record {getattr(record, 'id', '?')} {name}")

    def text_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def maskable(self, ids: Sequence[int]) -> list[bool]:
        return [t not in self.special_ids for t in ids]

    def last_image_index(self, ids: Sequence[int]) -> int:
        """Index of the last token belonging to an image block (its ``<|vision_end|>``), -1 if none."""
        last = -1
        for i, t in enumerate(ids):
            if t in (self.image_token_id, self.vision_start_id, self.vision_end_id):
                last = i
        return last

    def reject(self, reason: str, where: str) -> None:
        self.stats["rejected"] += 1
        self.stats[f"rejected_{reason}"] += 1
        log.warning(
            "cocoa collate: rejected %s (%s; max_length=%d). Truncation never cuts image tokens; raise max_length "
            "or lower image_max_pixels. Rejected so far: %d",
            where, reason, self.max_length, self.stats["rejected"],
        )

    # -- batching ---------------------------------------------------------------------------------
    def pad(self, samples: list[_Sample]) -> dict[str, torch.Tensor]:
        B = len(samples)
        L = max(len(s.ids) for s in samples)
        input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        maskable = torch.zeros((B, L), dtype=torch.bool)
        eos_pos = torch.full((B,), -1, dtype=torch.long)
        for b, s in enumerate(samples):
            n = len(s.ids)
            off = L - n if self.padding_side == "left" else 0
            input_ids[b, off : off + n] = torch.tensor(s.ids, dtype=torch.long)
            attn[b, off : off + n] = 1
            if s.maskable:
                maskable[b, off : off + n] = torch.tensor(s.maskable, dtype=torch.bool)
            if s.eos >= 0:
                eos_pos[b] = off + s.eos
        batch: dict[str, torch.Tensor] = {
            "input_ids": input_ids,
            "attention_mask": attn,
            "mm_token_type_ids": (input_ids == self.image_token_id).long() * attn,
            "eos_pos": eos_pos,
        }
        pv = [s.pixel_values for s in samples if s.pixel_values is not None]
        if pv:
            batch["pixel_values"] = torch.cat(pv, 0)
            batch["image_grid_thw"] = torch.cat([s.grid for s in samples if s.grid is not None], 0)
        batch["_maskable"] = maskable
        return batch

    def _finish(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch.pop("_maskable", None)
        return batch


def _size_get(ip: Any, key: str, alt: str) -> int | None:
    size = getattr(ip, "size", None)
    v = None
    if size is not None:
        v = size.get(key) if hasattr(size, "get") else getattr(size, key, None)
    return v or getattr(ip, alt, None)


class Stage1Collator(_Base):
    """Stage 1 (bidirectional warm-up): ``image block + (prompt + " " + text).strip()``, MNTP + MAE inputs.

    ``text_mask_ratio`` of each sample's text tokens (never image/special tokens, never the first
    position) become ``<|mask|>`` with labels; ``image_mask_ratio`` of each image's merge units are
    replaced (``image_mask_mode``: noise, zero or mean). Records are :class:`cocoa.records.MixRecord`.
    Returns ``None`` when every record of the batch was rejected (the loop should skip it).
    """

    def __init__(
        self,
        processor: Any,
        spec: EmbeddingSpec | None = None,
        text_mask_ratio: float = 0.2,
        image_mask_ratio: float = 0.5,
        image_mask_mode: str = "noise",
        max_length: int | None = None,
        image_root: Any = None,
        padding_side: str = "right",
        seed: int = 0,
    ) -> None:
        super().__init__(processor, spec, max_length, image_root, padding_side, seed)
        self.text_mask_ratio = text_mask_ratio
        self.image_mask_ratio = image_mask_ratio
        self.image_mask_mode = image_mask_mode

    def sample(self, record: Any) -> _Sample | None:
        self.check_record(record)
        image = load_image(record.image, self.image_root, f"record {record.id} image")
        text = (f"{record.prompt} {record.text}").strip()
        ids, pv, grid = self.encode(render_text(text, image is not None), image)
        if len(ids) > self.max_length:
            if self.last_image_index(ids) >= self.max_length:
                self.reject("image_exceeds_max_length", f"record {record.id}")
                return None
            ids = ids[: self.max_length]
            self.stats["truncated"] += 1
        mk = self.maskable(ids)
        if mk:
            mk[0] = False
        return _Sample(ids=ids, maskable=mk, pixel_values=pv, grid=grid)

    def __call__(self, records: Iterable[Any]) -> dict[str, torch.Tensor] | None:
        samples = [s for s in (self.sample(r) for r in records) if s is not None]
        if not samples:
            return None
        batch = self.pad(samples)
        batch["input_ids"], batch["labels"] = mask_text_tokens(
            batch["input_ids"], batch["_maskable"], self.text_mask_ratio, self.mask_token_id, self.generator
        )
        if "pixel_values" in batch:
            clean = batch["pixel_values"]
            batch["pixel_values"], batch["image_unit_mask"] = mask_image_units(
                clean, batch["image_grid_thw"], self.image_mask_ratio, self.merge_size, self.image_mask_mode,
                self.generator,
            )
            batch["pixel_values_clean"] = clean
        return self._finish(batch)


class Stage2Collator(_Base):
    """Stage 2 (EOS-bridged reconstruction): ``[A: image block + prompt] EOS [B: text]``.

    ``b_mask_ratio`` of B's tokens become ``<|mask|>`` (labels at those positions; the first B token is
    predicted from EOS). B is trimmed first when too long (at least one B token is kept); A is trimmed only
    after its image block; a sample whose image cannot fit is rejected and counted.
    Returns ``None`` when every record of the batch was rejected.
    """

    def __init__(
        self,
        processor: Any,
        spec: EmbeddingSpec | None = None,
        b_mask_ratio: float = 0.7,
        max_length: int | None = None,
        image_root: Any = None,
        padding_side: str = "right",
        seed: int = 0,
    ) -> None:
        super().__init__(processor, spec, max_length, image_root, padding_side, seed)
        self.b_mask_ratio = b_mask_ratio

    def sample(self, record: Any) -> _Sample | None:
        self.check_record(record)
        image = load_image(record.image, self.image_root, f"record {record.id} image")
        a_ids, pv, grid = self.encode(render_text(record.prompt.strip(), image is not None), image)
        b_ids = self.text_ids(record.text.strip())
        if not b_ids:
            self.reject("empty_block_b", f"record {record.id}")
            return None
        if not a_ids:
            self.reject("empty_block_a", f"record {record.id}")
            return None
        budget = self.max_length - 1  # EOS
        if len(a_ids) + len(b_ids) > budget:
            b_keep = max(1, budget - len(a_ids))
            b_ids = b_ids[:b_keep]
            if len(a_ids) + len(b_ids) > budget:
                a_keep = budget - len(b_ids)
                if self.last_image_index(a_ids) >= a_keep or a_keep < 1:
                    self.reject("image_exceeds_max_length", f"record {record.id}")
                    return None
                a_ids = a_ids[:a_keep]
            self.stats["truncated"] += 1
        ids = a_ids + [self.eos_token_id] + b_ids
        mk = [False] * (len(a_ids) + 1) + self.maskable(b_ids)
        return _Sample(ids=ids, eos=len(a_ids), maskable=mk, pixel_values=pv, grid=grid)

    def __call__(self, records: Iterable[Any]) -> dict[str, torch.Tensor] | None:
        samples = [s for s in (self.sample(r) for r in records) if s is not None]
        if not samples:
            return None
        batch = self.pad(samples)
        batch["input_ids"], batch["labels"] = mask_text_tokens(
            batch["input_ids"], batch["_maskable"], self.b_mask_ratio, self.mask_token_id, self.generator
        )
        return self._finish(batch)


class EmbedCollator(_Base):
    """Embedding inputs from ``(text, image)`` items: optional instruction, EOS appended and pooled.

    ``image`` may be an :class:`ImageRef` (resolved against ``image_root``), a PIL image or ``None``.
    Text that does not fit is trimmed from the end (the image block and EOS are kept); an item whose
    image alone does not fit raises :class:`CollateError`.
    """

    def __init__(
        self,
        processor: Any,
        spec: EmbeddingSpec | None = None,
        instruction: str | None = None,
        max_length: int | None = None,
        image_root: Any = None,
        padding_side: str = "right",
    ) -> None:
        super().__init__(processor, spec, max_length, image_root, padding_side, 0)
        self.instruction = instruction

    def sample(self, text: str | None, image: Any, index: int = 0) -> _Sample:
        self.check_text(text, f"embedding item {index} text")
        self.check_text(self.instruction, "the instruction")
        image = load_image(image, self.image_root, f"embedding item {index} image")
        text = text or ""
        if self.instruction:
            text = f"{self.instruction} {text}".strip()
        ids, pv, grid = self.encode(render_text(text, image is not None), image)
        if not ids and image is None:
            raise CollateError(f"embedding item {index} has neither text nor image")
        budget = self.max_length - 1
        if len(ids) > budget:
            if self.last_image_index(ids) >= budget:
                raise CollateError(
                    f"embedding item {index}: its image takes more than max_length={self.max_length} tokens; "
                    "raise max_length or lower image_max_pixels"
                )
            ids = ids[:budget]
            self.stats["truncated"] += 1
        ids = ids + [self.eos_token_id]
        return _Sample(ids=ids, eos=len(ids) - 1, pixel_values=pv, grid=grid)

    def __call__(self, items: Iterable[tuple[str | None, Any]]) -> dict[str, torch.Tensor]:
        samples = [self.sample(t, im, i) for i, (t, im) in enumerate(items)]
        if not samples:
            raise CollateError("EmbedCollator got an empty list of items")
        return self._finish(self.pad(samples))


def batch_to(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """Move every tensor of a batch to ``device``."""
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


__all__ = [
    "BATCH_KEYS", "CollateError", "EmbedCollator", "IGNORE", "IMAGE_BLOCK", "IMAGE_PLACEHOLDER", "MAX_ASPECT_RATIO",
    "SPECIAL_TOKENS", "Stage1Collator", "Stage2Collator", "batch_to", "check_image_size", "check_text", "load_image",
    "render_text", "special_token_in",
]
