"""Evaluation sets: EvalRecords of one dataset plus the directory their image paths are relative to."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..records import EvalRecord, RecordError


@dataclass
class EvalSet:
    name: str
    meta_task: str
    split: str
    records: list[EvalRecord]
    root: Path | None = None  # image paths in the records are relative to this directory
    source: str = ""  # where it was read from (for messages)
    meta: dict = field(default_factory=dict)


def _check_names(requested: Sequence[str] | None, known: Iterable[str], where: str, what: str = "dataset") -> list[str]:
    known = list(known)
    if not requested:
        return known
    unknown = [n for n in requested if n not in known]
    if unknown:
        raise RecordError(
            f"unknown {what}{'s' if len(unknown) > 1 else ''} {', '.join(repr(u) for u in unknown)} in {where}; "
            f"known: {', '.join(known) if known else '(none)'}"
        )
    seen: list[str] = []
    for n in requested:
        if n not in seen:
            seen.append(n)
    return seen


def _from_records(name: str, records: list[EvalRecord], root: Path | None, source: str) -> EvalSet:
    if not records:
        raise RecordError(f"{source}: dataset {name!r} has no records; regenerate it or leave it out (--datasets)")
    tasks = {r.meta_task for r in records}
    splits = {r.split for r in records}
    if len(tasks) > 1 or len(splits) > 1:
        raise RecordError(
            f"{source}: dataset {name!r} mixes meta-tasks {sorted(tasks)} / splits {sorted(splits)}; "
            "one dataset must have one meta-task and one split"
        )
    return EvalSet(name=name, meta_task=records[0].meta_task, split=records[0].split, records=records, root=root,
                   source=source)


def scenes_eval_dir(path: str | Path) -> Path:
    """The directory holding ``<dataset>/`` EvalRecord datasets: ``path/eval`` or ``path`` itself."""
    from ..shards import is_dataset

    p = Path(path)
    if not p.exists():
        raise RecordError(f"{p} does not exist; build the benchmark first (`cocoa-data scenes --out {p}`)")
    if (p / "eval").is_dir():
        return p / "eval"
    if is_dataset(p) or any(is_dataset(c) for c in p.iterdir() if c.is_dir()):
        return p
    raise RecordError(
        f"{p} holds no evaluation datasets (expected {p}/eval/<dataset>/manifest.json); "
        "pass the scenes root written by `cocoa-data scenes` or its eval/ directory"
    )


def list_scenes(path: str | Path) -> list[str]:
    from ..shards import is_dataset

    d = scenes_eval_dir(path)
    if is_dataset(d):
        return [d.name]
    return sorted(c.name for c in d.iterdir() if c.is_dir() and not c.name.startswith(".") and is_dataset(c))


def load_scenes(path: str | Path, datasets: Sequence[str] | None = None, limit: int | None = None) -> list[EvalSet]:
    """EvalRecord datasets under a scenes root (``root/eval/<dataset>/``) or its ``eval/`` dir."""
    from ..shards import is_dataset, open_dataset

    d = scenes_eval_dir(path)
    single = is_dataset(d)
    names = _check_names(datasets, list_scenes(path), str(d))
    sets = []
    for name in names:
        ddir = d if single else d / name
        ds = open_dataset(ddir)
        if ds.record_type != "EvalRecord":
            raise RecordError(f"{ddir} holds {ds.record_type} records, not EvalRecord; point at an evaluation dataset")
        recs: list[EvalRecord] = []
        for r in ds:
            recs.append(r)  # type: ignore[arg-type]
            if limit is not None and len(recs) >= limit:
                break
        sets.append(_from_records(name, recs, ddir, str(ddir)))
    return sets
