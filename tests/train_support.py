"""Helpers shared by the training-application tests (tests/test_train_*.py)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_workspace(scenes_root: Path, dest: Path) -> Path:
    """A training workspace: ``original/`` (the scenes PairRecords) and a ``mix/`` of MixRecords made from
    them (image + query prompt -> positive text), as `cocoa-data mix` would lay it out."""
    from cocoa.records import MixRecord
    from cocoa.shards import open_dataset, write_records

    dest.mkdir(parents=True, exist_ok=True)
    original = dest / "original"
    if not original.exists():
        original.symlink_to(Path(scenes_root) / "original", target_is_directory=True)
    store = Path(scenes_root) / "images"  # the build's image store: records refer to ../images/<xx>/<digest>
    if store.is_dir() and not (dest / "images").exists():
        shutil.copytree(store, dest / "images")
    mix = []
    for p in open_dataset(original):
        if p.qry_image is not None and p.pos_text.strip():
            mix.append(MixRecord(origin="original", origin_id=p.id, source=p.source, stages=[1, 2],
                                 image=p.qry_image, prompt=p.qry_text, text=p.pos_text))
    write_records(dest / "mix", "MixRecord", mix, overwrite=True)
    return dest


def losses(out: Path, stage: int) -> list[float]:
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["loss"] for r in rows if r["stage"] == stage]


def subprocess_env() -> dict[str, str]:
    """Environment for training subprocesses: offline, one thread (deterministic, and fair on 2 shared cores)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


PYTHON = sys.executable
