"""The source pairs of a synth run (:func:`open_source`): a scenes dataset, generated scene pairs, or
MMEB-train, with the row count to expect and the reader's own skips."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...records import PairRecord, RecordError
from ...shards import Workspace, is_dataset, open_dataset, read_manifest
from .config import WRITER, SynthConfig


@dataclass
class Source:
    name: str
    pairs: Iterable[PairRecord]
    total: int | None
    image_root: Path | None       # root for path-referenced images
    write_original: bool          # False when the input already is OUT/original
    describe: str
    report: Any = None            # rows the source skipped (bad images...), as QuarantineRecords
    images_checked: bool = False  # the reader already decoded every image (MMEB): no second decode


def _dataset_source(name: str, path: Path, ws: Workspace, limit: int | None) -> Source:
    # Source pairs are checked against their sha256 (flipped bytes must not reach the teacher or
    # original/): the read costs about as much as reading the pairs once, small against generation.
    ds = open_dataset(path, verify=True, record_type="PairRecord")
    total = len(ds) if limit is None else min(len(ds), limit)
    same = path.resolve() == ws.original.resolve()
    pairs: Iterable[PairRecord] = iter(ds)
    if limit is not None:
        pairs = itertools.islice(pairs, limit)
    return Source(name, pairs, total, path, not same, f"{name} pairs from {path}")


def open_source(config: SynthConfig, ws: Workspace) -> Source:
    if config.source == "scenes":
        if config.scenes_dir:
            root = Path(config.scenes_dir)
            if not root.is_dir():
                raise RecordError(f"--scenes-dir {root}: no such directory; build a scenes dataset with "
                                  "`cocoa-data scenes --out DIR` and pass that DIR")
            path = root / "original" if is_dataset(root / "original") else root
            if not is_dataset(path):
                raise RecordError(f"--scenes-dir {root}: no scenes dataset there (no original/manifest.json); "
                                  "build one with `cocoa-data scenes --out DIR`")
            return _dataset_source("scenes", path, ws, config.limit)
        if is_dataset(ws.original) and read_manifest(ws.original).provenance.get("writer") != WRITER:
            return _dataset_source("scenes", ws.original, ws, config.limit)
        from ...sources.scenes import iter_train_pairs

        n = config.scenes_n if config.limit is None else min(config.scenes_n, config.limit)
        return Source("scenes", iter_train_pairs(n, seed=config.scenes_seed), n, None, True,
                      f"{n} generated scene pairs (seed {config.scenes_seed})")
    return _mmeb_source(config)


def _mmeb_source(config: SynthConfig) -> Source:
    from ...sources import mmeb

    report = mmeb.SourceReport()
    src: str | Path = config.mmeb_dir or mmeb.TRAIN_REPO
    # validates its arguments now (before any output exists), rows come lazily
    pairs: Iterable[PairRecord] = mmeb.iter_mmeb_train(
        src, subsets=list(config.subsets) or None, split=config.mmeb_split, max_per_subset=config.max_per_subset,
        image_dir=config.mmeb_image_dir, report=report, source_flag="--mmeb-dir" if config.mmeb_dir else "",
        image_dir_flag="--mmeb-image-dir", split_flag="--mmeb-split")
    if config.limit is not None:
        pairs = itertools.islice(pairs, config.limit)
    total = _mmeb_row_estimate(config)
    return Source("mmeb", pairs, total, None, True, f"MMEB-train ({config.mmeb_split}) from {src}", report=report,
                  images_checked=True)


def _mmeb_row_estimate(config: SynthConfig) -> int | None:
    """Rows to expect (progress bar and ETA only), from parquet metadata of a local snapshot."""
    est = None
    if config.mmeb_dir and Path(config.mmeb_dir).is_dir():
        import pyarrow.parquet as pq

        root = Path(config.mmeb_dir)
        subsets = list(config.subsets) or sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        est = 0
        for sub in subsets:
            files = sorted((root / sub).glob(f"{config.mmeb_split}-*.parquet")) or sorted((root / sub).glob("train-*.parquet"))
            n = 0
            for f in files:
                with contextlib.suppress(Exception):
                    n += pq.ParquetFile(f).metadata.num_rows
            est += min(n, config.max_per_subset) if config.max_per_subset is not None else n
    if config.limit is not None:
        est = config.limit if est is None else min(est, config.limit)
    return est
