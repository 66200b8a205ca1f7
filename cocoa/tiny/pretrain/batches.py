"""Model inputs: examples -> processor batches with labels on the response only, one epoch of
length-grouped batches, and the response-only next-token loss."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from ...errors import CocoaError
from ...records import ImageRef, RecordError
from .examples import Example, prompt_text


class _Batcher:
    """Turns examples into model inputs with the processor (the user path: it expands the image pads and
    returns ``mm_token_type_ids``); labels are -100 except on the response and the EOS token."""

    def __init__(self, processor, eos_token: str, max_length: int, image_root: Path | None) -> None:  # type: ignore[no-untyped-def]
        self.processor = processor
        self.tok = processor.tokenizer
        self.eos = eos_token
        self.max_length = max_length
        self.image_root = image_root

    def texts(self, ex: Example) -> tuple[str, str]:
        return prompt_text(ex.prompt) + "\n", ex.response + self.eos

    def __call__(self, examples: list[Example]) -> dict[str, Any]:
        import torch

        images = []
        for ex in examples:
            try:
                images.append(ex.image.load(self.image_root))
            except CocoaError as e:
                raise RecordError(f"record {ex.record_id}: {e}") from None
        pairs = [self.texts(ex) for ex in examples]
        batch = self.processor(text=[p + r for p, r in pairs], images=images, return_tensors="pt",
                               padding=True, padding_side="right")
        ids = batch["input_ids"]
        labels = torch.full_like(ids, -100)
        lengths = batch["attention_mask"].sum(1).tolist()
        for i, (_, resp) in enumerate(pairs):
            r = self.tok(resp, add_special_tokens=False)["input_ids"]
            end = int(lengths[i])
            if ids[i, end - len(r):end].tolist() != r:  # the response did not tokenize on its own boundary
                raise RecordError(f"record {examples[i].record_id}: response tokens not found at the end of the "
                                  "sequence (tokenizer boundary); report this with the record")
            labels[i, end - len(r):end] = ids[i, end - len(r):end]
        batch["labels"] = labels
        return dict(batch)

    def length(self, ex: Example, image_tokens: int) -> int:
        p, r = self.texts(ex)
        return len(self.tok(p + r, add_special_tokens=False)["input_ids"]) + image_tokens - 1


def _length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random,
                            group: int = 8) -> list[list[int]]:
    """One epoch of batches: shuffle, sort by length within groups of ``group`` batches (less padding),
    then shuffle the batches. Deterministic for a given ``rng`` state."""
    perm = list(range(len(lengths)))
    rng.shuffle(perm)
    if len(perm) < batch_size:  # tiny data: repeat it to fill a batch
        perm = (perm * (batch_size // max(1, len(perm)) + 1))[: batch_size]
    batches: list[list[int]] = []
    span = batch_size * group
    for g in range(0, len(perm), span):
        chunk = sorted(perm[g:g + span], key=lambda i: lengths[i])
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    batches = [b for b in batches if len(b) == batch_size] or batches
    rng.shuffle(batches)
    return batches


def response_loss(model, batch: dict[str, Any]):  # type: ignore[no-untyped-def]
    """Next-token cross-entropy on the labelled (response) positions only.

    Same value as the HF model's ``loss`` with these labels, but the LM head and softmax run on the
    response positions instead of the whole sequence (the prompt and the image tokens are most of it)."""
    import torch.nn.functional as F

    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.model(**inputs).last_hidden_state  # [B, L, D]
    target = labels[:, 1:]
    sel = target != -100
    logits = model.lm_head(hidden[:, :-1][sel])
    return F.cross_entropy(logits.float(), target[sel])


def _image_size(ref: ImageRef, root: Path | None) -> tuple[int, int]:
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(ref.read_bytes(root))) as im:
            return im.size
    except CocoaError:
        raise
    except Exception as e:
        raise RecordError(f"image {ref.path or '<embedded>'} cannot be read ({type(e).__name__}: {e})") from None

