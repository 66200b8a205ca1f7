"""FlexAttention for Qwen2-VL through transformers' ``AttentionInterface`` (no modeling fork).

transformers refuses ``attn_implementation="flex_attention"`` for Qwen2-VL, so cocoa registers its own
attention function under :data:`FLEX_IMPL` (``"cocoa_flex"``). It runs
``torch.nn.attention.flex_attention`` when the layer receives a ``BlockMask`` (built by
:func:`cocoa.model.masks.block_mask`; a 4-D ``BlockMask`` passes through transformers' mask preparation
unchanged) and falls back to SDPA otherwise (the vision tower, which calls the same interface with no
mask). ``torch.nn.attention.flex_attention`` is imported lazily.
"""

from __future__ import annotations

from typing import Any

import torch

FLEX_IMPL = "cocoa_flex"
_compiled: dict[str, Any] = {}


def _flex_fn(device_type: str):  # type: ignore[no-untyped-def]
    from torch.nn.attention.flex_attention import flex_attention

    if device_type != "cuda":
        return flex_attention  # eager reference path (CPU tests)
    if "cuda" not in _compiled:
        _compiled["cuda"] = torch.compile(flex_attention, dynamic=False)
    return _compiled["cuda"]


def cocoa_flex_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query/key/value [B, H, L, D]`` -> ``([B, L, H, D], None)``."""
    from torch.nn.attention.flex_attention import BlockMask

    if not isinstance(attention_mask, BlockMask):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if dropout and module.training:
        raise ValueError("cocoa_flex attention does not support attention dropout; set attention_dropout=0")
    enable_gqa = query.shape[1] != key.shape[1]
    out = _flex_fn(query.device.type)(
        query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=enable_gqa
    )
    return out.transpose(1, 2).contiguous(), None


def register_flex_attention() -> str:
    """Register :func:`cocoa_flex_attention` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(FLEX_IMPL, cocoa_flex_attention)
    try:  # transformers also keeps a mask-function registry; a 4-D BlockMask bypasses it, but register for
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask  # completeness

        ALL_MASK_ATTENTION_FUNCTIONS.register(FLEX_IMPL, sdpa_mask)
    except Exception:  # pragma: no cover - older/newer transformers without this registry
        pass
    return FLEX_IMPL
