"""What a read did: :class:`SourceReport` (rows read / kept / skipped, each skip a quarantine row) and
the internal :class:`_Skip` a reader raises to set one row aside with its reason."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ...records import QuarantineRecord, canonical_json


@dataclass
class SourceReport:
    """What a read did: rows read/kept per subset and every skipped row with its reason."""

    read: Counter[str] = field(default_factory=Counter)
    kept: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> count
    quarantine: list[QuarantineRecord] = field(default_factory=list)
    converted: int = 0  # images re-encoded to RGB PNG (CMYK, RGBA, grayscale, palette, other formats)

    def add_skip(self, reason: str, detail: str, key: str, row: dict[str, Any], meta: dict[str, Any]) -> None:
        self.skipped[reason] += 1
        self.quarantine.append(QuarantineRecord(stage="source", reason=reason, detail=detail, key=key,
                                                payload=canonical_json(row), meta=meta))

    def summary(self) -> dict[str, Any]:
        return {"read": dict(self.read), "kept": dict(self.kept), "skipped": dict(self.skipped),
                "rows_read": sum(self.read.values()), "rows_kept": sum(self.kept.values()),
                "rows_skipped": sum(self.skipped.values()), "images_converted_to_rgb": self.converted}


class _Skip(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail
