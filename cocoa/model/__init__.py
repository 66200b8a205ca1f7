"""cocoa.model: the method library. CoCoA's masks and losses (pure, exactly tested functions), the
collators that build stage inputs, the model wrapper over a stock transformers Qwen2-VL / Qwen2.5-VL
(4D masks, EOS pooling, adapters), the embedding spec, and :class:`Embedder`, the one public object for
embeddings (``from_pretrained``, ``encode``, ``save``).

It imports nothing from the applications above it (``cocoa.train``, ``cocoa.eval``, ``cocoa.datagen``,
``cocoa.curation``, ``cocoa.cli``); ``tests/test_layout.py`` checks that.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Embedder", "CocoaModel", "EmbeddingSpec"]

_WHERE = {"Embedder": "embedder", "CocoaModel": "wrapper", "EmbeddingSpec": "spec"}


def __getattr__(name: str) -> Any:  # lazy: `import cocoa.model` does not import torch
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(name)
