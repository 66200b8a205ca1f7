"""Training data: memory-mapped Arrow shards, length-grouped deterministic batching, padding share.

* :class:`ArrowRecords` is a map-style dataset over a cocoa shard directory (``mix/`` or ``original/``):
  shards are opened with ``pyarrow.memory_map`` (zero copy; the OS pages rows in on demand) and a row is
  turned into its record (``MixRecord`` / ``PairRecord``) only when a batch asks for it. No full load.
  (Hugging Face ``datasets`` reads the same files, ``ShardDataset.to_hf()``, but it rewrites them into its
  cache; the GPU image also lacks it, so training reads the Arrow files directly.)
* :func:`length_grouped_batches` orders one epoch: a seeded shuffle, then "mega-batches" of
  ``mega * batch`` rows sorted by approximate length and cut into global batches, whose order is shuffled
  again. Same seed + epoch -> same batches, so a resumed run sees exactly the data an uninterrupted run
  would; each rank takes its contiguous slice of every global batch.
* :class:`BatchStream` walks (epoch, batch) positions from any starting step: the data position saved in
  checkpoints is just the global step.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ..records import from_row
from ..shards import ShardDataset
from ..errors import CocoaError


class DataError(CocoaError):
    """The training data cannot be used as it is; the message names the directory and the fix."""


# Approximate token cost of one image, for length grouping only (the collator computes the real count).
IMAGE_TOKENS_GUESS = 64
CHARS_PER_TOKEN = 3.5

_TEXT_COLUMNS = {
    "MixRecord": ("prompt", "text"),
    "PairRecord": ("qry_text", "pos_text"),
}
_IMAGE_COLUMNS = {
    "MixRecord": ("image",),
    "PairRecord": ("qry_image", "pos_image"),
}


class ArrowRecords:
    """Random access to the records of a cocoa dataset directory without loading it.

    ``ds[i]`` -> a validated record (``MixRecord``/``PairRecord``); ``ds.lengths`` -> approximate token
    lengths computed from Arrow columns (vectorised, no Python objects per row); ``ds.root`` is the
    directory images referenced by path are relative to.
    """

    def __init__(self, path: str | Path, record_type: str | None = None, *, stage: int | None = None,
                 verify: bool = False) -> None:
        self.root = Path(path)
        self._ds = ShardDataset(self.root, verify=verify, record_type=record_type)
        self.record_type = self._ds.record_type
        if len(self._ds) == 0:
            raise DataError(f"{self.root} holds no records; regenerate it (cocoa-data mix / cocoa-data scenes)")
        self.stage = stage
        self._files = self._ds.files
        self._tables: list[pa.Table] | None = None
        counts = [s.num_rows for s in self._ds.manifest.shards]
        self._check_rows(counts)
        self._starts = [0]
        for c in counts:
            self._starts.append(self._starts[-1] + c)
        self._lengths: list[int] | None = None
        self._rows: list[int] | None = None  # selected row ids (stage filter); None = all

    def _check_rows(self, counts: list[int]) -> None:
        """The manifest's row counts must be the shards' (an edited ``num_rows`` would index past a shard),
        and every shard must have the record type's columns. Cheap: memory-mapped, no row is read."""
        from ..shards import MANIFEST, schema_for

        mf = self.root / MANIFEST
        if sum(counts) != self._ds.manifest.num_rows:
            raise DataError(f"{mf}: num_rows says {self._ds.manifest.num_rows} but its shards list {sum(counts)} rows; "
                            "the manifest was edited or damaged: regenerate the dataset")
        try:
            tables = self._open()
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{self.root}: a shard is not a readable Arrow file ({e}); regenerate the dataset") from None
        want = schema_for(self.record_type).names
        for f, t, c in zip(self._files, tables, counts):
            if t.num_rows != c:
                raise DataError(f"{f} holds {t.num_rows} rows but {mf} says {c}; the manifest or the shard was edited: "
                                "regenerate the dataset")
            missing = [n for n in want if n not in t.schema.names]
            if missing:
                raise DataError(f"{f} lacks the {self.record_type} column(s) {', '.join(missing)}; it is not a "
                                f"{self.record_type} shard: regenerate the dataset")

    def where(self, i: int) -> str:
        """``DATASET/FILE row J`` of item ``i``, for messages."""
        f, j = self._locate(i)
        return f"{self._files[f]} row {j}"

    # -- pickling (DataLoader workers): memory maps are reopened in the worker -------------------
    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_tables"] = None
        return d

    def _open(self) -> list[pa.Table]:
        if self._tables is None:
            import pyarrow.ipc as ipc

            self._tables = [ipc.open_file(pa.memory_map(str(f), "r")).read_all() for f in self._files]
        return self._tables

    def _column(self, name: str) -> pa.ChunkedArray:
        return pa.chunked_array([c for t in self._open() for c in t.column(name).chunks],
                                type=self._open()[0].schema.field(name).type)

    # -- selection ---------------------------------------------------------------------------------
    def select_stage(self, stage: int) -> "ArrowRecords":
        """Keep only MixRecords whose ``stages`` list contains ``stage`` (a no-op for PairRecords)."""
        if self.record_type != "MixRecord":
            return self
        stages = self._column("stages").to_pylist()  # lists of small ints only: cheap
        rows = [i for i, v in enumerate(stages) if stage in (v or [])]
        if not rows:
            raise DataError(
                f"{self.root}: no record is marked for stage {stage} (column 'stages'); rebuild the mixture "
                f"with stage {stage} included, or point --stage{stage}-data elsewhere"
            )
        self._rows = rows
        self._lengths = None
        return self

    def __len__(self) -> int:
        return len(self._rows) if self._rows is not None else self._starts[-1]

    def _locate(self, i: int) -> tuple[int, int]:
        import bisect

        g = self._rows[i] if self._rows is not None else i
        f = bisect.bisect_right(self._starts, g) - 1
        return f, g - self._starts[f]

    def row(self, i: int) -> dict[str, Any]:
        f, j = self._locate(i)
        return self._open()[f].slice(j, 1).to_pylist()[0]

    def __getitem__(self, i: int) -> Any:
        f, j = self._locate(i)
        return from_row(self.record_type, self.row(i), where=f"{self._files[f]} row {j}")

    @property
    def lengths(self) -> list[int]:
        """Approximate tokens per row (text chars / 3.5 + a fixed cost per image), for grouping only."""
        if self._lengths is None:
            total = None
            for name in _TEXT_COLUMNS.get(self.record_type, ()):
                n = pc.fill_null(pc.utf8_length(self._column(name)), 0)
                total = n if total is None else pc.add(total, n)
            chars = [int(x or 0) for x in (total.to_pylist() if total is not None else [0] * self._starts[-1])]
            imgs = [0] * len(chars)
            for name in _IMAGE_COLUMNS.get(self.record_type, ()):
                valid = pc.is_valid(self._column(name)).to_pylist()
                imgs = [a + int(bool(b)) for a, b in zip(imgs, valid)]
            full = [int(math.ceil(c / CHARS_PER_TOKEN)) + IMAGE_TOKENS_GUESS * k + 2 for c, k in zip(chars, imgs)]
            self._lengths = [full[r] for r in self._rows] if self._rows is not None else full
        return self._lengths


# ---------------------------------------------------------------------------------------------------
# batching
# ---------------------------------------------------------------------------------------------------
def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, *,
                           group_by_length: bool = True, mega: int = 16, drop_last: bool = True) -> list[list[int]]:
    """One epoch of global batches (lists of dataset indices), deterministic in (seed, epoch)."""
    n = len(lengths)
    rng = random.Random(f"cocoa-batches:{seed}:{epoch}")
    order = list(range(n))
    rng.shuffle(order)
    if group_by_length:
        size = batch_size * mega
        grouped: list[int] = []
        for s in range(0, n, size):
            chunk = order[s:s + size]
            chunk.sort(key=lambda i: (-lengths[i], i))
            grouped += chunk
        order = grouped
    batches = [order[s:s + batch_size] for s in range(0, n, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if group_by_length:
        rng.shuffle(batches)  # mix long and short batches across the epoch
    return batches


def batch_too_large(stage: int | None, where: str, rows: int, batch_size: int) -> str:
    """The message for a dataset smaller than one global batch: which stage, which flag, what value fits."""
    flag = f"--stage{stage}-batch-size" if stage else "--stageK-batch-size"
    who = f"stage {stage}: " if stage else ""
    return (f"{who}{where} has {rows} rows, fewer than one global batch of {batch_size}; lower {flag} to at most "
            f"{rows} (e.g. {flag} {_pow2_at_most(rows)}) or add data")


def _pow2_at_most(n: int) -> int:
    p = 1
    while p * 2 <= n:
        p *= 2
    return p


def rank_slice(batch: Sequence[int], rank: int, world: int) -> list[int]:
    per = len(batch) // world
    return list(batch[rank * per:(rank + 1) * per])


@dataclass
class Position:
    epoch: int
    index: int  # batch index inside the epoch


class BatchStream:
    """Global batches for steps ``start, start+1, ...`` over as many epochs as needed."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, *, group_by_length: bool = True,
                 stage: int | None = None, where: str = "the dataset") -> None:
        if len(lengths) < batch_size:
            raise DataError(batch_too_large(stage, where, len(lengths), batch_size))
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self._cache: dict[int, list[list[int]]] = {}

    @property
    def batches_per_epoch(self) -> int:
        return len(self.lengths) // self.batch_size

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._cache:
            self._cache = {epoch: length_grouped_batches(self.lengths, self.batch_size, self.seed, epoch,
                                                         group_by_length=self.group_by_length)}
        return self._cache[epoch]

    def position(self, step: int) -> Position:
        return Position(step // self.batches_per_epoch, step % self.batches_per_epoch)

    def batch(self, step: int) -> list[int]:
        p = self.position(step)
        return self.epoch_batches(p.epoch)[p.index]

    def iter_from(self, step: int) -> Iterator[tuple[int, list[int]]]:
        while True:
            yield step, self.batch(step)
            step += 1


def padding_stats(batch: dict[str, Any]) -> tuple[int, int]:
    """(real tokens, padded slots) of a collated batch, from its 2D ``attention_mask`` (1 = token)."""
    import torch

    total_real, total_slots = 0, 0
    for key, value in _iter_masks(batch):
        if isinstance(value, torch.Tensor) and value.dim() == 2:
            total_real += int(value.sum())
            total_slots += value.numel()
    return total_real, total_slots


def _iter_masks(batch: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(batch, dict):
        for k, v in batch.items():
            if k in ("attention_mask", "padding_mask") and not isinstance(v, dict):
                yield prefix + k, v
            elif isinstance(v, dict):
                yield from _iter_masks(v, prefix + k + ".")


__all__ = ["ArrowRecords", "BatchStream", "DataError", "length_grouped_batches", "rank_slice", "padding_stats"]
