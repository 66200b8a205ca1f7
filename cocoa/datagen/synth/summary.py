"""What a synth run did (:class:`SynthSummary`) and how it can end short: :class:`SynthIncomplete` (work
left, rerun) and :class:`SynthEmpty` (no usable source pair)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import CocoaError
from ...shards import Workspace

QUARANTINE_WARN_SHARE = 0.10  # a larger quarantined share of the finished requests is a warning


@dataclass
class SynthSummary:
    out: Path
    pairs: int = 0
    requests: int = 0             # requests of this worker's partition
    skipped: int = 0              # already done by an earlier run
    ok: int = 0                   # requests with valid output
    retried: int = 0              # requests that needed more than one attempt
    quarantined: int = 0
    unavailable: int = 0          # not served (transport); left for a rerun
    records: Counter = field(default_factory=Counter)   # SynthRecords written by kind
    reasons: Counter = field(default_factory=Counter)   # quarantine reasons
    originals: int = 0
    bad_pairs: int = 0            # source pairs whose image cannot be read/decoded: quarantined, not in original/
    source_skipped: Counter = field(default_factory=Counter)  # rows the source reader set aside, by reason
    prompt_tokens: int = 0
    completion_tokens: int = 0
    images: int = 0
    seconds: float = 0.0
    generate_seconds: float = 0.0  # time inside the teacher's generate calls (no startup, reading or writing)
    complete: bool = False
    dry_run: bool = False
    examples: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "examples"}
        d["out"] = str(self.out)
        d["records"], d["reasons"] = dict(self.records), dict(self.reasons)
        d["source_skipped"] = dict(self.source_skipped)
        d.update(self.throughput())
        return d

    def throughput(self) -> dict[str, float]:
        """Tokens per second while the teacher generated (prompt tokens read, tokens generated) and over the
        whole run (wall clock: engine start, reading, validation and writing included)."""
        gen, wall = max(self.generate_seconds, 1e-9), max(self.seconds, 1e-9)
        if not self.generate_seconds:
            return {"generated_tokens_per_s": 0.0, "prompt_tokens_per_s": 0.0, "wall_generated_tokens_per_s": 0.0}
        return {"generated_tokens_per_s": round(self.completion_tokens / gen, 2),
                "prompt_tokens_per_s": round(self.prompt_tokens / gen, 2),
                "wall_generated_tokens_per_s": round(self.completion_tokens / wall, 2)}

    @property
    def usable_pairs(self) -> int:
        return self.pairs - self.bad_pairs

    def top_reasons(self, n: int = 5) -> str:
        c = self.reasons + Counter({f"source:{k}": v for k, v in self.source_skipped.items()
                                    if f"source:{k}" not in self.reasons})
        return ", ".join(f"{k} {v}" for k, v in c.most_common(n)) or "-"

    def quarantine_warning(self, share: float = QUARANTINE_WARN_SHARE) -> str | None:
        """A one-line warning when more than ``share`` of this run's finished work was quarantined."""
        done = self.ok + self.quarantined
        if not self.quarantined or self.quarantined <= share * done:
            return None
        return (f"{self.quarantined} of {done} finished items ({100 * self.quarantined / done:.0f}%) were quarantined; "
                f"top reasons: {self.top_reasons()}. The rows and their reasons are in "
                f"{Workspace(self.out).quarantine}")


class SynthIncomplete(CocoaError):
    """The run stopped with work left (server unavailable); committed work is kept, rerun to finish."""


class SynthEmpty(CocoaError):
    """The run finished but the source gave no usable pair: nothing to train on (a failure, not a success)."""
