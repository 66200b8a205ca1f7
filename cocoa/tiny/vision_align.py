"""Contrastive image-text alignment of the vision tower, before generative pre-training.

Real MLLMs never start their vision tower from random weights: Qwen2-VL's ViT was initialised from a
CLIP-style (DFN) contrastively trained encoder, LLaVA's from CLIP. A tiny Qwen2-VL built from a config
has a random ViT whose features of different scenes are nearly identical (cosine ~0.99, the grey
background dominates), and generative pre-training from there learns the language prior of the
captions and never starts looking (docs/models.md, "Does it see the image?"). This step gives the tiny
model what the real one inherits: a vision tower whose output encodes the image's content.

It trains the model's own vision tower (``model.model.visual``, patch embedding, blocks and merger) with
a symmetric InfoNCE loss against a throw-away bag-of-words text encoder (token embeddings from the
model's tokenizer, mean-pooled, then a linear map), on image -> text examples (captions and text
positives). The image side is the mean of the merger's output tokens, then a linear map. Only the vision
tower is kept; the two linear maps and the text encoder are discarded.
"""

from __future__ import annotations

import random
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model.objectives import info_nce

ALIGN_KINDS = ("caption", "pair")  # image -> text examples whose text describes the image


class BagOfWords(nn.Module):
    """Text encoder of the alignment step: mean of learned token embeddings, then a linear map."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(vocab_size, dim, mode="mean")
        self.proj = nn.Linear(dim, dim)

    def forward(self, ids: Sequence[Sequence[int]]) -> torch.Tensor:
        if any(len(x) == 0 for x in ids):
            raise ValueError("an alignment text tokenized to nothing; drop empty texts before aligning")
        flat = torch.tensor([i for x in ids for i in x], dtype=torch.long)
        offsets = torch.tensor([0] + [len(x) for x in ids[:-1]], dtype=torch.long).cumsum(0)
        return self.proj(self.emb(flat, offsets))


def pooled_image_features(visual: nn.Module, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
                          merge_size: int) -> torch.Tensor:
    """``[n_images, D]``: the mean of each image's merged tokens (what the LLM receives for it)."""
    out = visual(pixel_values, grid_thw=image_grid_thw)
    merged = out.pooler_output if hasattr(out, "pooler_output") else out  # transformers 5.x vs 4.x
    counts = (image_grid_thw.prod(-1) // (merge_size * merge_size)).tolist()
    return torch.stack([chunk.mean(0) for chunk in merged.split(counts)])


def mean_offdiag_cosine(x: torch.Tensor) -> float:
    """Mean cosine between different rows (1.0: all the same direction)."""
    x = F.normalize(x.float(), dim=-1)
    sim = x @ x.T
    n = sim.shape[0]
    return float((sim.sum() - sim.diagonal().sum()) / max(1, n * (n - 1)))


class VisionAligner:
    """Holds the alignment heads; :meth:`step` trains one batch, :meth:`evaluate` scores held-out pairs."""

    def __init__(self, model: nn.Module, processor: Any, *, dim: int = 128, lr: float = 1e-3,
                 weight_decay: float = 0.01, temperature: float = 0.07, grad_clip: float = 1.0) -> None:
        self.visual = model.model.visual
        self.processor = processor
        self.tok = processor.tokenizer
        self.merge = int(processor.image_processor.merge_size)
        hidden = int(model.config.text_config.hidden_size if hasattr(model.config, "text_config")
                     else model.config.hidden_size)
        self.img_proj = nn.Linear(hidden, dim)
        self.text = BagOfWords(len(self.tok), dim)
        self.temperature = temperature
        self.grad_clip = grad_clip
        self.params = [*self.visual.parameters(), *self.img_proj.parameters(), *self.text.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)

    def _encode(self, images: list[Any], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = self.processor.image_processor(images=images, return_tensors="pt")
        feats = pooled_image_features(self.visual, b["pixel_values"], b["image_grid_thw"], self.merge)
        ids = [self.tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        return feats, F.normalize(self.img_proj(feats), dim=-1), F.normalize(self.text(ids), dim=-1)

    def step(self, images: list[Any], texts: list[str]) -> dict[str, float]:
        t0 = time.perf_counter()
        self.visual.train()
        _, img, txt = self._encode(images, texts)
        loss, metrics = info_nce(img, txt, temperature=self.temperature, symmetric=True, gather=False)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"vision alignment diverged (loss {loss.item()}); lower the learning rate")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        return {"loss": metrics["loss"], "acc": metrics["acc"], "grad_norm": float(gnorm),
                "step_s": time.perf_counter() - t0}

    @torch.no_grad()
    def evaluate(self, images: list[Any], texts: list[str]) -> dict[str, float]:
        """Image -> text top-1 among the given pairs, and the mean cosine between the image features of
        different images (the vision tower's output; near 1.0 = it does not tell images apart)."""
        was = self.visual.training
        self.visual.eval()
        feats, img, txt = self._encode(images, texts)
        self.visual.train(was)
        acc = float(((img @ txt.T).argmax(-1) == torch.arange(len(texts))).float().mean())
        return {"i2t_top1": round(acc, 4), "feature_cosine": round(mean_offdiag_cosine(feats), 4),
                "n": len(texts)}


def align_vision(model: nn.Module, processor: Any, pairs: Sequence[tuple[Callable[[], Any], str]], *, steps: int,
                 batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                 heldout: Sequence[tuple[Callable[[], Any], str]] = (),
                 on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train ``model``'s vision tower in place for ``steps`` steps on (image loader, text) pairs.

    Returns a summary: first/last loss, and the held-out image -> text top-1 and feature cosine before
    and after (when ``heldout`` is given). Deterministic for a given seed (batches drawn with
    ``random.Random(seed)``; the heads are initialised under ``torch.manual_seed(seed)``)."""
    if steps < 1:
        raise ValueError("align_vision needs steps >= 1")
    if len(pairs) < 2:
        raise ValueError(f"vision alignment needs at least 2 image-text pairs, got {len(pairs)}")
    torch.manual_seed(seed)
    aligner = VisionAligner(model, processor, lr=lr)
    rng = random.Random(seed)
    bs = min(batch_size, len(pairs))

    def ev() -> dict[str, float]:
        return aligner.evaluate([load() for load, _ in heldout], [t for _, t in heldout]) if heldout else {}

    before = ev()
    losses: list[float] = []
    t0 = time.perf_counter()
    for s in range(1, steps + 1):
        batch = rng.sample(range(len(pairs)), bs)
        m = aligner.step([pairs[i][0]() for i in batch], [pairs[i][1] for i in batch])
        losses.append(m["loss"])
        if on_step is not None:
            on_step(s, m)
    k = min(20, len(losses))
    return {"steps": steps, "batch_size": bs, "lr": lr, "seconds": round(time.perf_counter() - t0, 1),
            "loss_first": round(sum(losses[:k]) / k, 4), "loss_last": round(sum(losses[-k:]) / k, 4),
            "heldout_before": before, "heldout_after": ev()}


__all__ = ["align_vision", "VisionAligner", "BagOfWords", "pooled_image_features", "mean_offdiag_cosine",
           "ALIGN_KINDS"]
