"""cocoa.eval: MMEB-V1 / scenes evaluation (P@1, embedding cache, reports) and :class:`Embedder`.

``evaluate(model_dir, benchmark, ...) -> EvalResult`` is the entry point; see docs/evaluation.md.
Imports are lazy so ``import cocoa.eval`` stays light (no torch until something is encoded).
"""

from __future__ import annotations

from typing import Any

__all__ = ["evaluate", "run", "EvalConfig", "EvalResult", "EvalSet", "Embedder", "hits_at_1", "aggregate", "summarize_runs",
           "load_sets"]

_WHERE = {
    "evaluate": "evaluator", "run": "evaluator", "EvalConfig": "evaluator", "EvalError": "evaluator", "load_sets": "evaluator",
    "EvalResult": "scoring", "hits_at_1": "scoring", "aggregate": "scoring", "summarize_runs": "scoring", "EvalSet": "data", "Embedder": ".model.embedder",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(name)
