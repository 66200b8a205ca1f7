"""Decontamination against evaluation data.

``--eval-data`` points at one EvalRecord dataset directory or at a root holding several (searched up to
three levels down, e.g. a scenes benchmark's ``root/eval/``). Eval images may be embedded or paths
relative to their dataset directory (resolved with ``ref.load(root=dataset_dir)``).

A training row is contaminated when
- its image is a pHash near-duplicate (Hamming distance <= ``image_distance``) of an eval image, or
- for some eval query/target text with at least ``ngram`` words, a share >= ``threshold`` of that
  text's informative word n-grams occur in the row's text. Eval texts shorter than ``ngram`` words
  (class labels) are too short to be evidence, and boilerplate is not used either: n-grams shared by
  ``template_texts`` or more distinct eval texts (prompt templates), and the n-grams of a text that
  accompanies an image in ``template_texts`` or more eval records (instructions such as
  "<|image_1|> Represent the given image.").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..records import RecordError, digest
from ..shards import MANIFEST, open_dataset, read_manifest
from .images import analyse_image, phash_pairs
from .text import ngrams, normalize_text, row_index, word_hashes
from ..errors import CocoaError


def mmeb_eval_datasets(path: Path) -> list[str]:
    """The MMEB-V1 datasets of an MMEB-eval directory in its published layout (``<Dataset>/test-*.parquet``
    + ``images.zip``, as ``TIGER-Lab/MMEB-eval``), or ``[]`` when ``path`` is not one."""
    from ..sources.mmeb import mmeb_v1_by_name

    if not path.is_dir():
        return []
    table = mmeb_v1_by_name()
    out = []
    for child in sorted(path.iterdir()):
        if child.name in table and child.is_dir() and not child.is_symlink() and (
                any(child.glob("test-*.parquet")) or (child / "test.parquet").is_file()
                or any((child / "test").glob("*.parquet"))):
            out.append(child.name)
    return out


@dataclass
class EvalSource:
    """Evaluation data to decontaminate against: a cocoa EvalRecord dataset or an MMEB-eval directory."""

    kind: str  # "cocoa" or "mmeb"
    path: Path
    datasets: list[str] = field(default_factory=list)  # MMEB-V1 names (kind "mmeb")

    def label(self) -> str:
        return str(self.path) if self.kind == "cocoa" else f"{self.path} (MMEB-eval: {', '.join(self.datasets)})"


def find_eval_sources(path: str | Path, max_depth: int = 3) -> list[EvalSource]:
    """EvalRecord dataset directories and MMEB-eval directories at or under ``path`` (sorted)."""
    path = Path(path)
    if not path.exists():
        raise RecordError(f"--eval-data {path} does not exist; point it at an eval dataset, a root holding some, "
                          "or an MMEB-eval directory")
    if not path.is_dir():
        raise RecordError(f"--eval-data {path} is a file, not a directory; point it at an eval dataset directory, "
                          "a root holding some (e.g. a scenes benchmark's eval/), or an MMEB-eval directory")
    found: list[EvalSource] = []

    def walk(p: Path, depth: int) -> None:
        if (p / MANIFEST).is_file():
            if read_manifest(p).record_type == "EvalRecord":
                found.append(EvalSource("cocoa", p))
            return
        names = mmeb_eval_datasets(p)
        if names:
            found.append(EvalSource("mmeb", p, names))
            return
        if depth >= max_depth:
            return
        for child in sorted(x for x in p.iterdir() if x.is_dir() and not x.is_symlink()):
            walk(child, depth + 1)

    walk(path, 0)
    if not found:
        raise RecordError(
            f"--eval-data {path} holds no evaluation data: no EvalRecord dataset (manifest.json of EvalRecord rows) "
            f"and no MMEB-eval directory (<Dataset>/test-*.parquet of MMEB-V1 datasets) within {max_depth} levels; "
            "point it at e.g. a scenes benchmark's eval/ directory or a TIGER-Lab/MMEB-eval snapshot"
        )
    return sorted(found, key=lambda s: str(s.path))


def find_eval_datasets(path: str | Path, max_depth: int = 3) -> list[Path]:
    """EvalRecord dataset directories at or under ``path`` (sorted; MMEB-eval directories not included)."""
    return [s.path for s in find_eval_sources(path, max_depth) if s.kind == "cocoa"]


@dataclass
class EvalIndex:
    """What decontamination compares against: eval image pHashes and eval text n-grams."""

    datasets: list[str] = field(default_factory=list)
    image_hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    image_labels: list[str] = field(default_factory=list)  # "dataset/record_id"
    text_labels: list[str] = field(default_factory=list)
    gram_hash: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    gram_text: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    text_ngrams: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    n_images: int = 0
    n_texts: int = 0
    unreadable: list[str] = field(default_factory=list)
    problems: dict[str, int] = field(default_factory=dict)  # reason -> eval images/rows not used
    template_ngrams: int = 0

    def problem(self, reason: str, message: str, n: int = 1) -> None:
        self.problems[reason] = self.problems.get(reason, 0) + n
        self.unreadable.append(message)

    def usable(self) -> bool:
        """Whether anything can be compared against: an eval image pHash or an eval text's n-grams."""
        return len(self.image_hashes) > 0 or bool((self.text_ngrams > 0).any())

    def warning(self) -> str | None:
        """One line when eval images or rows could not be used (decontamination is weaker), else None."""
        if not self.problems:
            return None
        top = sorted(self.problems.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        return (f"decontamination is incomplete: {sum(self.problems.values())} eval images/rows could not be used "
                f"({', '.join(f'{r} {n}' for r, n in top)}; e.g. {self.unreadable[0]}); {self.n_images} eval images "
                f"and {int((self.text_ngrams > 0).sum())} eval texts were used. Fix the eval data and rerun to "
                "decontaminate against all of it")

    def summary(self) -> dict:
        return {
            "datasets": self.datasets,
            "images": self.n_images,
            "texts_used": int(len(self.text_ngrams)),
            "texts_seen": self.n_texts,
            "template_ngrams_ignored": self.template_ngrams,
            "unreadable_images": self.unreadable[:20],
            "not_used": dict(sorted(self.problems.items())),
        }


def build_eval_index(path: str | Path, ngram: int, max_pixels: int, template_texts: int = 10) -> EvalIndex:
    import polars as pl

    idx = EvalIndex()
    seen_img: dict[str, int] = {}
    hashes: list[int] = []
    texts: dict[str, str] = {}
    with_image: dict[str, int] = {}
    for src in find_eval_sources(path):
        records, d, report = _records(src)
        idx.datasets.append(src.label())
        by_object: dict[int, tuple[bytes, str]] = {}  # embedded bytes seen in this dataset (MMEB reuses objects)
        current = None
        for rec in records:
            if rec.dataset != current:
                current, by_object = rec.dataset, {}
            label = f"{rec.dataset}/{rec.id}"
            sides = [(rec.qry_text, rec.qry_image)] + list(zip(rec.tgt_texts, rec.tgt_images))
            for t, img in sides:
                t = normalize_text(t or "")
                if t:
                    texts.setdefault(t, label)
                    if img is not None:  # text beside an image: an instruction when it repeats
                        with_image[t] = with_image.get(t, 0) + 1
            for ref in [rec.qry_image, *rec.tgt_images]:
                if ref is None:
                    continue
                if ref.bytes is None and f"{d}:{ref.path}" in seen_img:  # a file read before
                    continue
                if ref.bytes is not None and id(ref.bytes) in by_object:  # the same bytes object as before
                    continue
                try:
                    data = ref.read_bytes(d)
                except CocoaError as e:
                    idx.problem("image missing" if "is missing" in str(e) else "image unreadable", str(e))
                    continue
                key = digest(data)
                if ref.bytes is None:
                    seen_img[f"{d}:{ref.path}"] = -1
                else:
                    by_object[id(ref.bytes)] = (ref.bytes, key)  # holds the bytes, so the id stays unique
                if key in seen_img:
                    continue
                info = analyse_image(data, max_pixels, name=ref.path or key[:16])
                seen_img[key] = len(hashes)
                if info.ok and info.phash:
                    hashes.append(info.phash)
                    idx.image_labels.append(label)
                elif not info.ok:
                    idx.problem("image cannot be decoded", info.error)
        if report is not None:
            summ = report.summary()
            skipped = summ.get("skipped") or {}
            for k, v in sorted(skipped.items()):
                idx.problem(f"MMEB-eval rows skipped ({k})", f"MMEB-eval {src.path}: {v} rows skipped ({k})", int(v))
    idx.image_hashes = np.array(hashes, dtype=np.uint64)
    idx.n_images = sum(1 for v in seen_img.values() if v >= 0)
    idx.n_texts = len(texts)
    tlist = list(texts)
    if tlist:
        f, o = word_hashes(pl.Series(tlist, dtype=pl.String))
        g, go = ngrams(f, o, ngram, short="drop")
        # distinct n-grams per text
        df = pl.DataFrame({"t": row_index(go), "h": g}).unique(maintain_order=True)
        # boilerplate: n-grams shared by many distinct eval texts (instructions such as "Find a caption
        # describing the image") say nothing about leakage and would match every training query
        common = df.group_by("h").len().filter(pl.col("len") >= template_texts).select("h")
        # ... and every n-gram of a text that accompanies an image in many eval records (MMEB-style
        # instructions such as "<|image_1|> Represent the given image.")
        instr = [i for i, t in enumerate(tlist) if with_image.get(t, 0) >= template_texts]
        if instr:
            common = pl.concat([common, df.filter(pl.col("t").is_in(instr)).select("h")]).unique()
        idx.template_ngrams = common.height
        df = df.join(common, on="h", how="anti", maintain_order="left")
        n_per = df.group_by("t").agg(pl.len().alias("n"))
        full = np.zeros(len(tlist), dtype=np.int64)
        full[n_per["t"].to_numpy()] = n_per["n"].to_numpy()
        idx.gram_hash = df["h"].to_numpy()
        idx.gram_text = df["t"].to_numpy()
        idx.text_ngrams = full
        idx.text_labels = [texts[t] for t in tlist]
    return idx


def _records(src: EvalSource):  # type: ignore[no-untyped-def]
    """(EvalRecord iterator, data root of its image paths, MMEB SourceReport or None)."""
    if src.kind == "cocoa":
        return iter(open_dataset(src.path, record_type="EvalRecord")), src.path, None
    from ..sources.mmeb import SourceReport, iter_mmeb_eval

    report = SourceReport()
    return iter_mmeb_eval(src.path, datasets=src.datasets, on_error="skip", report=report), src.path, report


def image_matches(idx: EvalIndex, hashes: np.ndarray, distance: int) -> dict[int, str]:
    """Positions in ``hashes`` (0 = no hash, skipped) matching an eval image -> the eval label."""
    valid = np.flatnonzero(hashes != 0)
    if len(valid) == 0 or len(idx.image_hashes) == 0:
        return {}
    pairs = phash_pairs(hashes[valid], idx.image_hashes, distance)
    out: dict[int, str] = {}
    for i, j in pairs:
        out.setdefault(int(valid[i]), idx.image_labels[int(j)])
    return out


def text_matches(idx: EvalIndex, flat_words: np.ndarray, offsets: np.ndarray, ngram: int,
                 threshold: float) -> dict[int, tuple[str, float]]:
    """Rows whose text covers >= ``threshold`` of some eval text's n-grams -> (eval label, share)."""
    import polars as pl

    if len(idx.gram_hash) == 0:
        return {}
    g, go = ngrams(flat_words, offsets, ngram, short="drop")
    if len(g) == 0:
        return {}
    rows = pl.DataFrame({"r": row_index(go), "h": g}).unique()
    ev = pl.DataFrame({"h": idx.gram_hash, "t": idx.gram_text})
    hit = rows.join(ev, on="h")
    if hit.height == 0:
        return {}
    agg = hit.group_by("r", "t").agg(pl.len().alias("n"))
    totals = pl.DataFrame({"t": np.arange(len(idx.text_ngrams), dtype=np.int64), "total": idx.text_ngrams})
    agg = agg.join(totals, on="t").with_columns(share=pl.col("n") / pl.col("total"))
    agg = agg.filter(pl.col("share") >= threshold).sort(["r", "share", "t"], descending=[False, True, False])
    agg = agg.unique("r", keep="first", maintain_order=True)
    return {int(r): (idx.text_labels[int(t)], float(s)) for r, t, s in agg.select("r", "t", "share").iter_rows()}
