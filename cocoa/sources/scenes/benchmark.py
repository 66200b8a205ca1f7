"""Materialising the benchmark: ``root/original`` (PairRecord shards), ``root/eval/<Dataset>/``
(EvalRecord shards + content-addressed ``images/``) and ``root/benchmark.json``, built under temporary
names and swapped in whole; and reading an eval directory through Hugging Face ``datasets``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...fs import NotOwnedError, check_removable, exclusive_lock, has_content, is_owned, mark_owned, remove_owned_tree
from ...records import ImageRef, RecordError, digest
from .evalsets import iter_eval_sets
from .tasks import iter_train_pairs
from .vocab import DATASETS, HELD_OUT_COMBOS, dataset_names


class _DirStore:
    """Content-addressed image files under ``<dataset dir>/images/<xx>/<digest>.png``."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        self.dirs = dirs
        self.written: Counter[str] = Counter()
        self._seen: set[tuple[str, str]] = set()

    def __call__(self, dataset: str, data: bytes) -> ImageRef:
        h = digest(data)
        rel = f"images/{h[:2]}/{h}.png"
        if (dataset, h) not in self._seen:
            self._seen.add((dataset, h))
            f = self.dirs[dataset] / rel
            if not f.exists():
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_bytes(data)
                self.written[dataset] += 1
        return ImageRef(path=rel)


Progress = Callable[[str, int, int], None]


def build_benchmark(
    root: str | Path, n_train: int = 20000, eval_per_task: int = 200, n_distractors: int = 999, seed: int = 0,
    *, image_size: int = 112, datasets: list[str] | None = None, overwrite: bool = False,
    progress: Progress | None = None, shard_rows: int = 5000,
) -> dict[str, Any]:
    """Write ``root/original`` (PairRecord shards) and ``root/eval/<Dataset>/`` (EvalRecord shards +
    ``images/``) and ``root/benchmark.json``; return the summary (also written there).

    Each directory is built under a temporary name and moved into place when complete, so an
    interrupted build never leaves a directory a reader would take for a finished one.
    """
    if image_size < 28:
        raise RecordError(f"image_size {image_size} is too small; use at least 28 (one 14-px patch pair)")
    if n_train < 0 or eval_per_task < 0 or n_distractors < 1:
        raise RecordError("n_train and eval_per_task must be >= 0 and n_distractors >= 1")
    root = Path(root)
    names = dataset_names(datasets)
    targets = [root / "original"] + [root / "eval" / n for n in names]
    existing = [p for p in targets if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        raise RecordError(f"{existing[0]} already exists; pass overwrite=True (--overwrite) or choose another --out")
    for p in existing:  # refuse before building anything: --overwrite replaces only cocoa's own datasets
        if p.is_dir() and not p.is_symlink() and has_content(p) and not is_owned(p):
            check_removable(p, flag="--overwrite")  # names what cocoa did not write there
        if p.is_symlink() or not p.is_dir() or (has_content(p) and not is_owned(p)):
            raise NotOwnedError(f"{p} exists and was not made by cocoa (no cocoa manifest or marker); --overwrite only "
                                "replaces cocoa's own output. Remove it yourself if you mean it, or choose another --out")
    if root.exists() and not root.is_dir():
        raise RecordError(f"--out {root} is a file, not a directory; choose a directory for the benchmark")
    fresh = not root.exists() or (root.is_dir() and not has_content(root))
    with exclusive_lock(root, name=".cocoa-scenes.lock", what="it is building a scenes benchmark there;"):
        if fresh:
            mark_owned(root, "workspace")
        return _build(root, names, n_train, eval_per_task, n_distractors, seed, image_size, progress, shard_rows)


def _build(root: Path, names: list[str], n_train: int, eval_per_task: int, n_distractors: int, seed: int,
           image_size: int, progress: Progress | None, shard_rows: int) -> dict[str, Any]:
    from ...shards import ImageStore, ShardWriter, atomic_write_json

    (root / "eval").mkdir(parents=True, exist_ok=True)
    prog = progress or (lambda stage, done, total: None)

    def tmp_for(p: Path) -> Path:
        t = p.with_name(f".{p.name}.tmp")
        remove_owned_tree(t, flag="a rebuild")  # an interrupted build's own leftover (cocoa-made) only
        return t

    def swap(tmp: Path, final: Path) -> None:
        remove_owned_tree(final, flag="--overwrite")
        tmp.rename(final)

    params = {"n_train": n_train, "eval_per_task": eval_per_task, "n_distractors": n_distractors, "seed": seed,
              "image_size": image_size}
    prov = {"source": "scenes", **params, "held_out_combos": sorted(map(list, HELD_OUT_COMBOS))}
    summary: dict[str, Any] = {"root": str(root), **params, "held_out_combos": prov["held_out_combos"],
                               "train": {}, "eval": {}}

    # training pairs
    tmp = tmp_for(root / "original")
    counts: Counter[str] = Counter()
    images = ImageStore(root)  # root/images: each image once; original/ refers to it (../images/...)
    images.clean()
    with ShardWriter(tmp, "PairRecord", max_rows=shard_rows, provenance=prov, before_commit=images.sync) as w:
        for k, rec in enumerate(iter_train_pairs(n_train, seed, image_size=image_size)):
            w.write(images.store_record(rec))
            counts[rec.meta["task"]] += 1
            if (k + 1) % 50 == 0 or k + 1 == n_train:
                prog("train", k + 1, n_train)
    swap(tmp, root / "original")
    summary["train"] = {"rows": n_train, "tasks": dict(sorted(counts.items()))}

    # evaluation sets
    for name in names:
        final = root / "eval" / name
        tmp = tmp_for(final)
        tmp.mkdir(parents=True)
        store = _DirStore({name: tmp})
        info = DATASETS[name]
        n_cand: list[int] = []
        with ShardWriter(tmp, "EvalRecord", max_rows=max(1, min(shard_rows, 200_000 // max(1, n_distractors))),
                         provenance={**prov, "dataset": name, **info}) as w:
            for k, rec in enumerate(iter_eval_sets(eval_per_task, n_distractors, seed, image_size=image_size,
                                                   datasets=[name], store=store)):
                w.write(rec)
                n_cand.append(len(rec.tgt_texts))
                prog(name, k + 1, eval_per_task)
        swap(tmp, final)
        summary["eval"][name] = {
            "meta_task": info["meta_task"], "split": info["split"], "queries": len(n_cand),
            "candidates": max(n_cand) if n_cand else 0, "images": store.written[name],
        }
    atomic_write_json(root / "benchmark.json", summary)
    return summary


def load_eval_hf(dataset_dir: str | Path):  # type: ignore[no-untyped-def]
    """An evaluation dataset directory through Hugging Face ``datasets``, with image paths made
    absolute so that ``Image`` features decode from any working directory (what
    ``open_dataset(dir).to_hf()`` does for every dataset)."""
    from ...shards import open_dataset

    return open_dataset(Path(dataset_dir).resolve()).to_hf()
