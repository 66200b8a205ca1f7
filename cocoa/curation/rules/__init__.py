"""cocoa.curation.rules: the curation rules, one module per rule family with its features, and
:data:`STEPS`, the order they run in (the first failing rule names a row's drop).

validity (``invalid_record``), image_checks (the image rules), quality (length, patterns, repetition, QA),
duplicates (exact and near), contamination (against evaluation data)."""

from __future__ import annotations

from ..steps import Step
from . import contamination, duplicates, image_checks, quality, validity

STEPS: list[Step] = [
    *validity.STEPS,
    *image_checks.CHECKS,
    *quality.STEPS,
    *duplicates.STEPS,
    image_checks.NEAR_DUP,
    *contamination.STEPS,
]
RULES = [s.name for s in STEPS]

__all__ = ["STEPS", "RULES"]
