"""cocoa: CoCoA (collaborative-attention reconstruction) for multimodal embedding models.

Library layout: ``cocoa.records`` (data contract), ``cocoa.shards`` (Arrow IO), ``cocoa.datagen``
(sources, teachers, synth), ``cocoa.curation`` (filters, dedup, mix), ``cocoa.train`` (masks,
objectives, model wrapper, loop), ``cocoa.eval`` (MMEB/scenes evaluation, ``Embedder``).
"""

from ._version import __version__  # noqa: F401


def __getattr__(name: str):  # lazy: `from cocoa import Embedder` without importing torch up front
    if name == "Embedder":
        from .model.embedder import Embedder

        return Embedder
    raise AttributeError(name)
