"""CoCoA's training objectives, as plain functions over tensors.

* :func:`mask_text_tokens` + :func:`mntp_loss` — stage 1 masked next-token prediction (LLM2Vec-style:
  a masked token at position ``i`` is predicted from the hidden state at ``i-1`` through the LM head).
* :func:`mask_image_units` + :class:`ImageDecoder` + :func:`mae_loss` — stage 1 masked image modelling
  over whole spatial-merge units of ``pixel_values``.
* :func:`eos_reconstruction_loss` — stage 2: masked B tokens predicted from the previous position
  (the first B token from EOS) under the collaborative mask.
* :func:`info_nce` (+ :func:`gather_with_grad`) and :func:`grad_cache_step` — stage 3.

Label convention (shared with :mod:`cocoa.model.collate`): ``labels[b, i]`` holds the original token
id at a masked position ``i`` and ``-100`` elsewhere; the prediction for ``labels[b, i]`` is read from
the hidden state at ``i - 1``.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE = -100
PATCH_DIM = 3 * 2 * 14 * 14  # Qwen2-VL pixel_values row: channels x temporal patch x 14 x 14


# ---------------------------------------------------------------------------------------------
# text masking and shifted prediction (stages 1 and 2)
# ---------------------------------------------------------------------------------------------
def mask_text_tokens(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    ratio: float,
    mask_token_id: int,
    generator: torch.Generator | None = None,
    min_masked: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace ``round(ratio * n)`` of each row's maskable tokens with ``mask_token_id``.

    ``maskable`` (bool ``[B, L]``) marks the positions that may be masked (text tokens only: never image,
    special, EOS or padding tokens, and never the first real position, which has no predecessor).
    Each row with maskable tokens gets at least ``min_masked`` masked tokens. Returns
    ``(masked_input_ids, labels)``; labels hold the original ids at masked positions and -100 elsewhere.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    ids = input_ids.clone()
    labels = torch.full_like(input_ids, IGNORE)
    for b in range(input_ids.shape[0]):
        pos = maskable[b].nonzero(as_tuple=True)[0]
        n = pos.numel()
        if n == 0 or ratio == 0.0:
            continue
        k = min(n, max(min_masked, int(round(ratio * n))))
        chosen = pos[torch.randperm(n, generator=generator)[:k].to(pos.device)]
        labels[b, chosen] = input_ids[b, chosen]
        ids[b, chosen] = mask_token_id
    return ids, labels


def shifted_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where to read predictions for ``labels``: ``(batch_idx, source_pos, target_ids)`` with
    ``source_pos = target_pos - 1``. A label at position 0 (no predecessor) is an error."""
    if bool((labels[:, 0] != IGNORE).any()):
        raise ValueError("a label sits at position 0, which has no previous position to predict it from")
    b, i = (labels != IGNORE).nonzero(as_tuple=True)
    return b, i - 1, labels[b, i]


def mntp_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module | Callable) -> torch.Tensor:
    """Masked next-token prediction: cross-entropy of ``lm_head(hidden[b, i-1])`` against ``labels[b, i]``
    averaged over masked positions. Logits are computed only at those positions. 0 (with grad) if none."""
    b, src, tgt = shifted_positions(labels)
    if tgt.numel() == 0:
        return hidden.sum() * 0.0
    logits = lm_head(hidden[b, src])
    return F.cross_entropy(logits.float(), tgt)


def eos_reconstruction_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head: nn.Module | Callable,
    eos_pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stage 2: masked B tokens predicted from the previous position (the first B token from EOS).

    Identical arithmetic to :func:`mntp_loss`; with ``eos_pos`` given it also checks that every label
    lies after its sample's EOS (in block B), so A can only inform the prediction through EOS.
    """
    if eos_pos is not None:
        b, i = (labels != IGNORE).nonzero(as_tuple=True)
        if bool((i <= eos_pos.to(i.device)[b]).any()):
            raise ValueError("stage-2 labels must lie in block B (after the EOS position)")
    return mntp_loss(hidden, labels, lm_head)


# ---------------------------------------------------------------------------------------------
# image masking and MAE (stage 1)
# ---------------------------------------------------------------------------------------------
def merge_unit_counts(image_grid_thw: torch.Tensor, merge_size: int = 2) -> list[int]:
    """LLM image tokens (= spatial-merge units) per image: ``t * h * w / merge_size**2``."""
    return [int(t * h * w) // (merge_size**2) for t, h, w in image_grid_thw.tolist()]


def mask_image_units(
    pixel_values: torch.Tensor,
    image_grid_thw: torch.Tensor,
    ratio: float = 0.5,
    merge_size: int = 2,
    mode: Literal["noise", "zero", "mean"] = "noise",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask whole spatial-merge units of Qwen2-VL ``pixel_values``.

    In Qwen2-VL's processor ordering, rows ``[u*m^2, (u+1)*m^2)`` of ``pixel_values`` (``m`` =
    ``merge_size``) are the ``m x m`` patches merged into LLM image token ``u`` (images concatenated in
    order). Per image, ``round(ratio * units)`` units (at least 1 when ``ratio > 0``) are replaced:
    ``noise`` = standard normal values (the processor's values are normalised, ~N(0,1)), ``zero`` = 0,
    ``mean`` = the image's mean row. Returns ``(corrupted_pixel_values, unit_mask)``, ``unit_mask`` a
    bool ``[total_units]`` aligned with the LLM image tokens.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"image mask ratio must be in [0, 1], got {ratio}")
    g = merge_size**2
    counts = merge_unit_counts(image_grid_thw, merge_size)
    total = sum(counts)
    if total * g != pixel_values.shape[0]:
        raise ValueError(
            f"pixel_values has {pixel_values.shape[0]} rows but image_grid_thw implies {total * g}"
        )
    unit_mask = torch.zeros(total, dtype=torch.bool)
    out = pixel_values.clone()
    units = out.view(total, g, -1)
    offset = 0
    for n in counts:
        k = 0 if ratio == 0.0 else min(n, max(1, int(round(ratio * n))))
        chosen = torch.randperm(n, generator=generator)[:k] + offset
        unit_mask[chosen] = True
        if k:
            if mode == "noise":
                repl = torch.randn((k, g, units.shape[-1]), generator=generator).to(units)
            elif mode == "zero":
                repl = torch.zeros((k, g, units.shape[-1]), dtype=units.dtype, device=units.device)
            elif mode == "mean":
                mean = pixel_values[offset * g : (offset + n) * g].mean(0)
                repl = mean.expand(k, g, -1)
            else:
                raise ValueError(f"image mask mode must be noise, zero or mean, got {mode!r}")
            units[chosen.to(units.device)] = repl
        offset += n
    return out, unit_mask.to(pixel_values.device)


def mae_targets(pixel_values: torch.Tensor, merge_size: int = 2, norm_pix: bool = False) -> torch.Tensor:
    """Regression targets ``[units, m^2 * 1176]`` from clean ``pixel_values``; with ``norm_pix`` each
    14x14 patch row is normalised to zero mean / unit variance (MAE's per-patch normalisation)."""
    x = pixel_values.float()
    if norm_pix:
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True, unbiased=False)
        x = (x - mean) / (var + 1e-6).sqrt()
    return x.reshape(-1, merge_size**2 * x.shape[-1])


def mae_loss(
    pred: torch.Tensor,
    pixel_values: torch.Tensor,
    unit_mask: torch.Tensor,
    merge_size: int = 2,
    norm_pix: bool = False,
) -> torch.Tensor:
    """MSE between ``pred`` (``[units, m^2*1176]``, one row per LLM image token, or already only the
    masked units ``[masked_units, ...]``) and the clean pixels of the masked units; unmasked units do
    not count. 0 (with grad) when nothing is masked."""
    target = mae_targets(pixel_values, merge_size, norm_pix)
    if pred.shape[0] == target.shape[0]:
        pred = pred[unit_mask]
    target = target[unit_mask]
    if target.shape[0] == 0:
        return pred.sum() * 0.0
    if pred.shape != target.shape:
        raise ValueError(f"MAE prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    return F.mse_loss(pred.float(), target)


class ImageDecoder(nn.Module):
    """MAE pixel decoder: one transformer layer initialised from an LLM decoder layer, then a linear
    layer to ``merge_size**2 * 1176`` values per LLM image token.

    ``forward(hidden, position_embeddings, attention_mask, select)`` runs the layer over the whole
    sequence (same 4D mask and rotary embeddings as the LLM) and returns predictions for the positions
    in ``select`` (bool ``[B, L]``, the masked image tokens), ``[n_selected, m^2*1176]``.
    """

    def __init__(self, layer: nn.Module, hidden_size: int, out_dim: int = 4 * PATCH_DIM, copy_layer: bool = True):
        super().__init__()
        self.layer = copy.deepcopy(layer) if copy_layer else layer
        self.head = nn.Linear(hidden_size, out_dim)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(
        self,
        hidden: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: Any,
        select: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = self.layer(
            hidden, attention_mask=attention_mask, position_embeddings=position_embeddings, position_ids=position_ids
        )
        if isinstance(out, tuple):
            out = out[0]
        return self.head(out[select])


# ---------------------------------------------------------------------------------------------
# contrastive learning (stage 3)
# ---------------------------------------------------------------------------------------------
def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` across ranks (``[world*n, ...]``), gradients flowing through the local part
    only (other ranks' parts are constants). Identity when torch.distributed is not initialised."""
    if not _dist_ready() or torch.distributed.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, x.detach().contiguous())
    parts[torch.distributed.get_rank()] = x
    return torch.cat(parts, 0)


def info_nce(
    query: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 0.02,
    negatives: torch.Tensor | None = None,
    symmetric: bool = False,
    gather: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """InfoNCE over in-batch negatives, gathered across ranks when ``gather``, with optional hard negatives.

    ``query``/``target`` are ``[n, D]`` (normalised by the caller); query ``i``'s positive is target ``i``.
    ``negatives`` (``[n, D]`` or ``[n, k, D]``) are appended as extra candidates for the query->target
    direction (every query sees every negative). ``symmetric`` averages in the target->query direction.

    Across ranks (torch.distributed initialised, ``gather``): queries, targets and negatives of all ranks
    are gathered (the local part keeps its gradient, the others are constants) and every rank computes
    the same full-batch loss over all ``world * n`` queries. The returned loss is multiplied by the world
    size, so that DDP's gradient averaging yields exactly the full-batch gradient; ``metrics["loss"]`` is
    the unscaled full-batch value. Metrics also hold the query->target top-1 accuracy.
    """
    world = torch.distributed.get_world_size() if (gather and _dist_ready()) else 1
    q = gather_with_grad(query) if world > 1 else query
    t = gather_with_grad(target) if world > 1 else target
    labels = torch.arange(q.shape[0], device=q.device)
    cands = t
    if negatives is not None:
        neg = negatives.reshape(-1, negatives.shape[-1])
        neg = gather_with_grad(neg) if world > 1 else neg
        cands = torch.cat([t, neg], 0)
    logits = q.float() @ cands.float().T / temperature
    loss = F.cross_entropy(logits, labels)
    with torch.no_grad():
        acc = (logits.argmax(-1) == labels).float().mean().item()
    if symmetric:
        logits_t = t.float() @ q.float().T / temperature
        loss = 0.5 * (loss + F.cross_entropy(logits_t, labels))
    metrics = {"loss": float(loss.detach()), "acc": acc, "n_candidates": float(cands.shape[0])}
    return loss * world, metrics


class RandContext:
    """Captures the CPU (and current CUDA device's) RNG state so a forward can be replayed exactly
    (dropout and other randomness identical in GradCache's second pass)."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self.cpu_state = torch.get_rng_state()
        self.cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.cuda_state = torch.cuda.get_rng_state() if self.cuda else None

    @contextmanager
    def replay(self) -> Iterator[None]:
        devices = [torch.cuda.current_device()] if self.cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu_state)
            if self.cuda:
                torch.cuda.set_rng_state(self.cuda_state)
            yield


def grad_cache_step(
    encode: Callable[[Any], torch.Tensor],
    groups: Sequence[Sequence[Any]],
    loss_fn: Callable[..., tuple[torch.Tensor, dict[str, float]]],
    scale: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One GradCache step (Gao et al. 2021): large-batch contrastive gradients in bounded memory.

    ``groups`` is a list of input groups (e.g. ``[query_chunks, target_chunks]`` or with a third group of
    hard-negative chunks), each a list of chunks that ``encode(chunk) -> [n_chunk, D]`` embeds.

    1. every chunk is embedded without gradients, saving the RNG state before each forward;
    2. the chunk embeddings are concatenated per group; ``loss_fn(*group_embeddings)`` is computed with
       gradients w.r.t. those embeddings (leaf tensors) and backpropagated to them;
    3. every chunk is re-embedded with gradients under its saved RNG state and
       ``backward(cached_grad)`` accumulates the parameter gradients.

    Parameter ``.grad`` then equals that of ``loss_fn`` on the full batch (times ``scale``). Returns
    ``(loss.detach(), metrics)``. Does not zero grads or step the optimizer. Under DDP, run all but the
    last re-forward inside ``model.no_sync()`` (or accept one gradient all-reduce per chunk).
    """
    states: list[list[RandContext]] = []
    embs: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for chunks in groups:
            s, e = [], []
            for chunk in chunks:
                s.append(RandContext())
                e.append(encode(chunk).detach())
            states.append(s)
            embs.append(e)
    full = [torch.cat(e, 0).requires_grad_(True) for e in embs]
    with torch.enable_grad():
        loss, metrics = loss_fn(*full)
        (loss * scale).backward()
    for gi, chunks in enumerate(groups):
        grads = full[gi].grad
        if grads is None:
            continue
        off = 0
        for ci, chunk in enumerate(chunks):
            n = embs[gi][ci].shape[0]
            with states[gi][ci].replay():
                emb = encode(chunk)
            emb.backward(grads[off : off + n].to(emb.dtype))
            off += n
    return loss.detach(), metrics
