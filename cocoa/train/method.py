"""The CoCoA method as the stage runner drives it, behind a thin adapter over :mod:`cocoa.model`: load a
stage's :class:`~cocoa.model.wrapper.CocoaModel`, its collator and loss call, the DDP dispatch module,
autocast, and one stage-3 GradCache step over the global contrastive batch.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

from .batches import count_tokens
from .config import TrainConfig


def load_cocoa_model(path: str, config: TrainConfig, k: int, device: Any, dtype: Any) -> Any:
    """Stage ``k``'s input model as a CocoaModel: attention backend, token overrides, pixel bounds and max
    length from the config (stage 1 with its image decoder), on ``device``."""
    from ..model.wrapper import CocoaModel
    from ..model.spec import SPEC_FILE, EmbeddingSpec

    s = config.stage(k)
    impl = {"sdpa": "sdpa", "eager": "eager", "flex": "cocoa_flex"}[s.attention_backend]
    spec = None
    over: dict[str, Any] = {}
    if config.eos_token:
        over.update(eos_token=config.eos_token, eos_token_id=None)
    if config.mask_token:
        over.update(mask_token=config.mask_token, mask_token_id=None)
    if over:
        base = EmbeddingSpec.load(path) if (Path(path) / SPEC_FILE).is_file() else EmbeddingSpec()
        spec = base.model_copy(update=over)
    model = CocoaModel.from_pretrained(path, spec=spec, attn_implementation=impl, load_image_decoder=(k == 1),
                                       dtype=dtype)
    if s.image_min_pixels or s.image_max_pixels:
        _set_pixels(model.processor, s.image_min_pixels, s.image_max_pixels)
    upd: dict[str, Any] = {"max_length": s.max_length}
    if s.image_min_pixels:
        upd["image_min_pixels"] = s.image_min_pixels
    if s.image_max_pixels:
        upd["image_max_pixels"] = s.image_max_pixels
    if k == 3:
        upd["attention"] = config.stage3.attention  # evaluation pools exactly as stage 3 trained
    model.spec = model.spec.model_copy(update=upd)
    if k == 1:
        model.ensure_image_decoder()  # before adapters are injected (it copies a plain LLM layer)
    return model.to(device)


def stage_call(config: TrainConfig, k: int) -> tuple[str, dict[str, Any]]:
    """The CocoaModel method and keyword arguments computing stage ``k``'s loss (stages 1-2)."""
    if k == 1:
        return "stage1_loss", {"mae_weight": config.stage1.mae_weight, "norm_pix": config.stage1.norm_pix_loss}
    return "stage2_loss", {"variant": config.stage2.mask_variant}


def _set_pixels(processor: Any, lo: int | None, hi: int | None) -> None:
    ip = processor.image_processor
    size = dict(getattr(ip, "size", None) or {})
    if lo:
        ip.min_pixels = lo
        size["shortest_edge"] = lo
    if hi:
        ip.max_pixels = hi
        size["longest_edge"] = hi
    if size:
        ip.size = size


def make_collator(model: Any, config: TrainConfig, k: int, data_root: Path, seed: int) -> Any:
    """Stage ``k``'s collator: ``Stage1Collator`` / ``Stage2Collator`` / ``EmbedCollator``."""
    from ..model.collate import EmbedCollator, Stage1Collator, Stage2Collator

    s = config.stage(k)
    if k == 1:
        return Stage1Collator(model.processor, model.spec, text_mask_ratio=config.stage1.text_mask_ratio,
                              image_mask_ratio=config.stage1.image_mask_ratio, image_mask_mode=config.stage1.mask_fill,
                              max_length=s.max_length, image_root=data_root, seed=seed)
    if k == 2:
        return Stage2Collator(model.processor, model.spec, b_mask_ratio=config.stage2.b_mask_ratio,
                              max_length=s.max_length, image_root=data_root, seed=seed)
    return EmbedCollator(model.processor, model.spec, max_length=s.max_length, image_root=data_root)


def as_loss(out: Any) -> tuple[Any, dict[str, float]]:
    """``(loss, metrics)`` from a CocoaModel stage loss; metric names: ``loss_<part>``, ``acc``, ``n_*``."""
    loss, parts = (out[0], out[1]) if isinstance(out, tuple) else (out, {})
    clean: dict[str, float] = {}
    for key, v in (parts or {}).items():
        if key == "loss":
            continue
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        clean[key if key == "acc" or key.startswith(("n_", "loss_")) else f"loss_{key}"] = v
    return loss, clean


def dispatch_module(inner: Any) -> Any:
    """``inner`` behind a module whose ``forward(method, ...)`` calls ``inner.method(...)``: DDP sees every
    forward (its reducer hooks need forward to go through it)."""
    import torch

    class Dispatch(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.inner = m

        def forward(self, method: str, *args: Any, **kw: Any) -> Any:
            return getattr(self.inner, method)(*args, **kw)

    return Dispatch(inner)


def autocast(device: Any, precision: str) -> Any:
    """bf16 autocast on CUDA (``--precision auto``) or when asked (``bf16``); else nothing."""
    import torch

    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """The batch's tensors on ``device``."""
    import torch

    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def stage3_step(wrapped: Any, model: Any, groups: list[list[dict[str, Any]]], config: TrainConfig, info: Any,
                amp: Any) -> tuple[float, dict[str, float], int, int]:
    """One GradCache step over this rank's slice of the global batch; the loss is the global-batch InfoNCE
    (every rank computes it on the gathered embeddings; gradients reach the local slice), scaled by the
    world size because DDP averages gradients."""
    import torch

    from ..model.objectives import gather_with_grad, grad_cache_step, info_nce

    s3 = config.stage3
    tok = slots = 0
    for g in groups:
        for b in g:
            t, sl = count_tokens(b)
            tok, slots = tok + t, slots + sl
    groups = [[to_device(b, info.device) for b in g] for g in groups]
    n_chunks = sum(len(g) for g in groups)
    counter = {"grad_forwards": 0}

    def encode(batch: dict[str, Any]) -> torch.Tensor:
        ddp = wrapped if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) else None
        if ddp is not None and torch.is_grad_enabled():
            counter["grad_forwards"] += 1
            ddp.require_backward_grad_sync = counter["grad_forwards"] == n_chunks  # all-reduce once, at the end
        with amp:
            return wrapped("embed", batch, mask=s3.attention).float()

    def loss_fn(q: torch.Tensor, t: torch.Tensor, n: torch.Tensor | None = None) -> tuple[Any, dict[str, float]]:
        qa, ta = gather_with_grad(q), gather_with_grad(t)
        na = gather_with_grad(n) if n is not None else None
        return info_nce(qa, ta, temperature=s3.temperature, negatives=na, gather=False)

    if s3.grad_cache:
        loss, parts = grad_cache_step(encode, groups, loss_fn, scale=float(info.world))
    else:
        embs = [torch.cat([encode(b) for b in g], 0) for g in groups]
        loss, parts = loss_fn(*embs)
        (loss * info.world).backward()
        loss = loss.detach()
    out_parts = {"acc": float(parts.get("acc", 0.0))} if isinstance(parts, dict) else {}
    # every rank holds the same global loss; the stage runner averages over ranks
    return float(loss), out_parts, tok, slots


__all__ = ["load_cocoa_model", "stage_call", "make_collator", "as_loss", "dispatch_module", "autocast", "to_device",
           "stage3_step"]
