"""The batches of one stage, step by step: :class:`StepBatches` reads each step's rows (its rank's slice of
the deterministic global batch), decodes their images, handles bad rows (``--on-bad-row raise|skip``,
:class:`BadRowError` names the row) and collates them into micro batches (stages 1-2) or query / target /
negative chunks (stage 3).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from .preflight import TrainError
from ..errors import CocoaError


def step_seed(seed: int, k: int, step: int, rank: int, micro: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{k}:{step}:{rank}:{micro}".encode()).digest()[:7], "little")


class BadRowError(TrainError):
    """A training row whose image cannot be read (``--on-bad-row raise``); ``reason`` is the short form."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


_IMAGE_FIELDS = {"MixRecord": ("image",), "PairRecord": ("qry_image", "pos_image", "neg_image")}
_SKIP_HINT = (". Fix or remove the row, or pass --on-bad-row skip to skip such rows (they are counted in "
              "metrics.jsonl and the stage summary)")


class StepBatches:
    """Map-style dataset: item ``j`` = the collated inputs of one micro batch (stages 1-2) or of one step
    (stage 3: query / target / negative chunks). Deterministic in (seed, stage, step, rank), so it runs in
    DataLoader workers and resumes exactly.

    Images are decoded here, row by row, so a bad one is named (dataset file, row, record id, field):
    ``on_bad_row="raise"`` stops with that name, ``"skip"`` drops the row (stage 3 under several processes
    swaps in the next readable row instead, so every rank keeps the same batch size). Each item reports its
    skipped rows and the collator's truncation / rejection counts (they travel back from DataLoader workers)."""

    def __init__(self, records: Any, stream: Any, collator: Any, k: int, start: int, end: int, rank: int,
                 world: int, micro: int, seed: int, hard_negatives: bool, on_bad_row: str = "raise") -> None:
        self.records, self.stream, self.collator = records, stream, collator
        self.k, self.start, self.end = k, start, end
        self.rank, self.world, self.micro, self.seed = rank, world, micro, seed
        self.per_rank = stream.batch_size // world
        self.n_micro = 1 if k == 3 else math.ceil(self.per_rank / micro)
        self.hard_negatives = hard_negatives
        self.on_bad_row = on_bad_row

    def __len__(self) -> int:
        return max(0, self.end - self.start) * self.n_micro

    def _where(self, i: int) -> str:
        where = getattr(self.records, "where", None)
        return where(i) if where is not None else f"row {i}"

    def load(self, i: int) -> Any:
        """Record ``i`` with its images decoded (PIL), or :class:`BadRowError` naming the row."""
        from ..model.collate import load_image

        try:
            rec = self.records[i]
        except CocoaError as e:
            msg = f"stage {self.k}: {self._where(i)} is not a valid record ({e})"
            raise BadRowError(msg + _SKIP_HINT, msg) from None
        check = getattr(self.collator, "check_record", None)
        if check is not None:  # text the processor cannot take (a Qwen special token): a bad row, skippable
            try:
                check(rec)
            except CocoaError as e:
                msg = f"stage {self.k}: {self._where(i)}: {e}"
                raise BadRowError(msg + _SKIP_HINT, msg) from None
        root = getattr(self.records, "root", None)
        upd: dict[str, Any] = {}
        for name in _IMAGE_FIELDS.get(type(rec).__name__, ()):
            ref = getattr(rec, name, None)
            if ref is None:
                continue
            try:
                upd[name] = load_image(ref, root)
            except CocoaError as e:
                msg = f"stage {self.k}: {self._where(i)} (record {rec.id}, {name}): {e}"
                raise BadRowError(msg + _SKIP_HINT, msg) from None
        return rec.model_copy(update=upd) if upd else rec

    def _rows(self, idx: list[int], swap: bool) -> tuple[list[Any], list[str]]:
        recs: list[Any] = []
        skipped: list[str] = []
        n = len(self.records)
        for i in idx:
            try:
                recs.append(self.load(i))
                continue
            except BadRowError as e:
                if self.on_bad_row != "skip":
                    raise
                skipped.append(e.reason)
            if swap:  # the next readable row after i (deterministic), so the batch keeps its size
                for d in range(1, min(n, 1000)):
                    try:
                        recs.append(self.load((i + d) % n))
                        break
                    except BadRowError:
                        continue
        return recs, skipped

    def _counts(self, before: dict[str, int]) -> dict[str, int]:
        st = self.collator.stats
        return {key: int(st.get(key, 0)) - before.get(key, 0) for key in ("truncated", "rejected")}

    def __getitem__(self, j: int) -> dict[str, Any]:
        # An error travels back as a value: raised in a DataLoader worker it would come back re-wrapped with
        # the worker's traceback in its message instead of one clean line.
        try:
            return self._item(j)
        except CocoaError as e:
            return {"error": str(e), "step": self.start + j // self.n_micro}

    def _item(self, j: int) -> dict[str, Any]:
        import torch

        from .data import rank_slice

        step = self.start + j // self.n_micro
        m = j % self.n_micro
        idx = rank_slice(self.stream.batch(step), self.rank, self.world)
        before = {key: int(self.collator.stats.get(key, 0)) for key in ("truncated", "rejected")}
        if self.k != 3:
            part = idx[m * self.micro:(m + 1) * self.micro]
            recs, skipped = self._rows(part, swap=False)
            self.collator.generator = torch.Generator().manual_seed(step_seed(self.seed, self.k, step, self.rank, m))
            batch = self.collator(recs) if recs else None
            return {"step": step, "micro": m, "n_micro": self.n_micro, "batch": batch, "rows": len(part),
                    "samples": len(recs), "skipped": skipped, **self._counts(before)}
        recs, skipped = self._rows(idx, swap=self.world > 1)
        if not recs:
            raise BadRowError(f"stage 3 step {step}: every row of the batch was skipped as unreadable "
                              f"(first: {skipped[0] if skipped else '?'}); fix the dataset")
        chunks = [recs[s:s + self.micro] for s in range(0, len(recs), self.micro)]
        groups = [[self.collator([(r.qry_text, r.qry_image) for r in c]) for c in chunks],
                  [self.collator([(r.pos_text, r.pos_image) for r in c]) for c in chunks]]
        if self.hard_negatives and all((r.neg_text or r.neg_image is not None) for r in recs):
            groups.append([self.collator([(r.neg_text, r.neg_image) for r in c]) for c in chunks])
        return {"step": step, "micro": 0, "n_micro": 1, "groups": groups, "rows": len(idx),
                "samples": len(recs) * len(groups), "skipped": skipped, **self._counts(before)}


def count_tokens(batch: Any) -> tuple[int, int]:
    """``(real tokens, token slots)`` of a collated batch; ``(0, 0)`` for none."""
    from .data import padding_stats

    if batch is None:
        return 0, 0
    return padding_stats(batch)


__all__ = ["StepBatches", "BadRowError", "count_tokens", "step_seed"]
