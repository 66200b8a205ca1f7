"""`cocoa-data curate`: ``synthetic/`` -> ``curated/`` (+ ``curated/rejected/``, ``curated/report.json``).

The pipeline is a list of small named steps (:data:`STEPS`) over one Polars frame with a row per
synthetic record. Per-row rules are Polars expressions applied lazily; rules that compare rows
(exact and near duplicates, image near-duplicates, decontamination) see only the rows still alive
after the rules before them. The first rule that fails names the row's ``reason``; every dropped row
is written to ``curated/rejected/`` as a ``QuarantineRecord(stage="curate", reason=<rule>)``.

With ``--eval-data``, original PairRecords (``original/``) are decontaminated too: contaminated
original rows are written to ``curated/rejected/`` (``meta.input = "original"``) and ``mix`` leaves
them out.
"""

from __future__ import annotations

import hashlib
import json
import time
from json.encoder import encode_basestring as _enc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from ..records import canonical_json, content_id, digest, from_row, payload_json, schema_for
from ..shards import (MANIFEST, ShardDataset, ShardError, ShardWriter, Workspace, atomic_write_json, open_dataset,
                      read_manifest)
from .config import CurationConfig
from .dedup import first_of_groups_cols, near_duplicates, text_digests
from .images import ImageTable, image_key, phash_clusters
from .text import WORD_RE, combined_pattern, longest_repeat, normalize_series, repeated_share, word_hashes
from ..errors import CocoaError

REASON = "_reason"
DETAIL = "_detail"


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------
def dataset_checksum(path: Path) -> dict[str, Any]:
    """Checksums of a dataset: its manifest file and the sha256 over its shards' sha256s.

    Reads the manifest only: callers have opened (and so checked) the dataset already.
    """
    m = read_manifest(path)
    content = hashlib.sha256("".join(s.sha256 for s in m.shards).encode()).hexdigest()
    return {
        "path": str(path),
        "record_type": m.record_type,
        "rows": m.num_rows,
        "manifest_sha256": hashlib.sha256((path / MANIFEST).read_bytes()).hexdigest(),
        "content_sha256": content,
    }


def open_checked(path: Path, record_type: str, what: str, hint: str | None = None) -> ShardDataset:
    """Open a dataset, refusing a missing/empty directory and shards whose schema does not match.

    ``hint`` says how to create the dataset (the command to run), for the missing/empty message.
    """
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        if hint is None:
            hint = ("`cocoa-data synth`" if record_type == "SynthRecord"
                    else "`cocoa-data scenes` or `cocoa-data synth --source mmeb`")
            hint = f"create it first ({hint})"
        raise ShardError(f"{path} is missing or empty: there is no {what} to read; {hint}")
    ds = open_dataset(path, record_type=record_type)
    want = schema_for(record_type)
    for f in ds.files:
        got = ds._open(f).schema
        missing = [n for n in want.names if n not in got.names]
        wrong = [n for n in want.names if n in got.names and not got.field(n).type.equals(want.field(n).type)]
        if missing or wrong:
            raise ShardError(
                f"{f} does not have the {record_type} schema (missing columns: {missing or 'none'}; "
                f"columns of another type: {wrong or 'none'}); it was not written by this cocoa version "
                "or is damaged: regenerate the dataset"
            )
    return ds


# ---------------------------------------------------------------------------------------------
# row validation (the SynthRecord contract, vectorised; tests cross-check it against from_row)
# ---------------------------------------------------------------------------------------------
def _json_object_problem(text: str) -> str | None:
    try:
        v = json.loads(text)
    except ValueError as e:
        return f"meta is not valid JSON ({e})"
    return None if isinstance(v, dict) else f"meta is JSON but not an object (got {type(v).__name__})"


def _path_problem(path: str) -> str | None:
    from ..records import _check_relpath

    try:
        _check_relpath(path)
    except ValueError as e:
        return f"image {e}"
    return None


def record_problems(ds: ShardDataset):  # type: ignore[no-untyped-def]
    """Per row of a SynthRecord dataset: why it is not a valid SynthRecord (None when it is).

    The same rules as the ``SynthRecord`` model (``cocoa.records``), computed column-wise so a million
    rows cost seconds, not a pydantic model each: required strings non-empty, ``kind`` caption or qa
    with the matching text fields, an image with bytes or a safe relative path, teacher/template
    present, ``meta`` a JSON object. Rows that fail are rejected as ``invalid_record`` with this detail.
    """
    pl = _pl()
    lf = ds.scan()
    s = lambda c: pl.col(c).str.strip_chars()  # noqa: E731
    empty = lambda c: pl.col(c).is_null() | (pl.col(c) == "")  # noqa: E731
    blank = lambda c: pl.col(c).is_null() | (s(c) == "")  # noqa: E731
    tf = lambda c, f: pl.col(c).struct.field(f)  # noqa: E731
    kind = pl.col("kind")
    checks = [
        (pl.col("id").is_null(), "id is null"),
        (empty("parent_id"), "parent_id is empty"),
        (pl.col("source").is_null(), "source is null"),
        (kind.is_null(), "kind is null"),
        (~kind.is_in(["caption", "qa"]), pl.format("kind '{}' is not caption or qa", kind)),
        ((kind == "caption") & blank("caption"), "a caption record needs a non-empty caption"),
        ((kind == "caption") & (pl.col("question").is_not_null() | pl.col("answer").is_not_null()),
         "a caption record carries no question/answer"),
        ((kind == "qa") & (blank("question") | blank("answer")), "a qa record needs a non-empty question and answer"),
        ((kind == "qa") & pl.col("caption").is_not_null(), "a qa record carries no caption"),
        (pl.col("image").is_null() | (tf("image", "bytes").is_null() & tf("image", "path").is_null()),
         "image has neither bytes nor a path"),
        (pl.col("teacher").is_null() | (tf("teacher", "backend").fill_null("") == "")
         | (tf("teacher", "model").fill_null("") == "") | tf("teacher", "revision").is_null(),
         "teacher needs a backend, a model and a revision"),
        (pl.col("template").is_null() | (tf("template", "name").fill_null("") == "")
         | (tf("template", "hash").fill_null("") == ""), "template needs a name and a hash"),
        (empty("params_hash"), "params_hash is empty"),
        (empty("key"), "key is empty"),
    ]
    detail = pl.lit(None, dtype=pl.String)
    for cond, msg in reversed(checks):
        detail = pl.when(cond.fill_null(True)).then(msg if isinstance(msg, pl.Expr) else pl.lit(msg)).otherwise(detail)
    df = lf.select(detail.alias("d"), tf("image", "path").alias("path"), pl.col("meta")).collect()
    out = df["d"]
    # image paths and meta: few distinct values, checked with the model's own helpers
    for col, check in (("path", _path_problem), ("meta", _json_object_problem)):
        vals = df[col].drop_nulls().unique()
        if col == "meta":
            vals = vals.filter(vals != "")
        bad = {v: m for v in vals.to_list() if (m := check(v)) is not None}
        if bad:
            extra = df[col].replace_strict(bad, default=None, return_dtype=pl.String)
            out = pl.DataFrame({"a": out, "b": extra}).select(pl.coalesce("a", "b")).to_series()
    return out.alias("_invalid")


# ---------------------------------------------------------------------------------------------
# steps
# ---------------------------------------------------------------------------------------------
@dataclass
class Context:
    cfg: CurationConfig
    df: Any  # polars DataFrame, one row per synthetic record
    words: tuple[np.ndarray, np.ndarray] | None = None  # word hashes of df["text"]
    eval_index: Any = None
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Step:
    name: str  # also the rejection reason of the rows this step drops ("" for transforms)
    doc: str
    expr: Callable[[Context], Any] | None = None  # per-row: (condition, detail) Polars expressions
    group: Callable[[Context, np.ndarray], dict[int, str]] | None = None  # rows compared: {row: detail}
    enabled: Callable[[CurationConfig], bool] = lambda cfg: True


def _pl():  # type: ignore[no-untyped-def]
    import polars as pl

    return pl


def _kind(k: str):  # type: ignore[no-untyped-def]
    return _pl().col("kind") == k


def _length_rule(ctx: Context):  # type: ignore[no-untyped-def]
    pl = _pl()
    t = ctx.cfg.text
    checks = [
        ("caption", "cap_words", t.caption_min_words, t.caption_max_words, _kind("caption")),
        ("question", "q_words", t.question_min_words, t.question_max_words, _kind("qa")),
        ("answer", "a_words", t.answer_min_words, t.answer_max_words, _kind("qa")),
    ]
    cond = pl.lit(False)
    detail = pl.lit(None, dtype=pl.String)
    for name, col, lo, hi, which in reversed(checks):
        bad = which & ((pl.col(col) < lo) | (pl.col(col) > hi))
        msg = pl.format(f"{name} has {{}} words (allowed {lo}..{hi})", pl.col(col))
        detail = pl.when(bad).then(msg).otherwise(detail)
        cond = cond | bad
    return cond, detail


def _pattern_rule(attr: str):  # type: ignore[no-untyped-def]
    def rule(ctx: Context):  # type: ignore[no-untyped-def]
        pl = _pl()
        pat = combined_pattern(getattr(ctx.cfg.text, attr))
        if pat is None:
            return pl.lit(False), pl.lit(None, dtype=pl.String)
        field_ = pl.when(_kind("qa")).then(pl.col("answer")).otherwise(pl.col("caption"))
        hit = field_.str.extract(pat, 0)
        return hit.is_not_null(), pl.concat_str([pl.lit("matched '"), hit, pl.lit("'")])

    return rule


def _repeat_share_rule(ctx: Context):  # type: ignore[no-untyped-def]
    pl = _pl()
    r = ctx.cfg.repetition
    bad = (pl.col("rep_share") > r.max_repeated_share) & (pl.col("rep_ngrams") >= r.min_ngrams)
    return bad, pl.format(f"{{}} of {r.ngram}-grams repeat (max {r.max_repeated_share})", pl.col("rep_share").round(3))


def _repeat_run_rule(ctx: Context):  # type: ignore[no-untyped-def]
    pl = _pl()
    r = ctx.cfg.repetition
    return pl.col("rep_run") >= r.max_run, pl.format(f"a unit repeats {{}} times in a row (max {r.max_run - 1})",
                                                     pl.col("rep_run"))


def _qa_copy_rule(ctx: Context):  # type: ignore[no-untyped-def]
    pl = _pl()
    q = pl.col("question").fill_null("").str.to_lowercase().str.extract_all(WORD_RE)
    a = pl.col("answer").fill_null("").str.to_lowercase().str.extract_all(WORD_RE)
    au = a.list.unique()
    inter = au.list.set_intersection(q.list.unique()).list.len()
    share = inter / au.list.len().clip(lower_bound=1)
    same = a.list.join(" ") == q.list.join(" ")
    restate = (share >= ctx.cfg.qa.max_answer_question_overlap) & (pl.col("a_words") >= 0.8 * pl.col("q_words"))
    bad = _kind("qa") & (same | restate)
    return bad, pl.format("answer restates the question ({} of its words are the question's)", share.round(2))


_QWORDS = (r"(?i)^(?:what|which|who|whom|whose|where|when|why|how|is|are|was|were|do|does|did|can|could|"
           r"should|would|will|has|have|had|in|on|at|from|describe|name|count|list|identify|tell)\b")


def _qa_form_rule(ctx: Context):  # type: ignore[no-untyped-def]
    pl = _pl()
    q = pl.col("question").fill_null("")
    ok = q.str.ends_with("?") | q.str.contains(_QWORDS)
    return _kind("qa") & ~ok, pl.lit("question neither ends with '?' nor starts with a question word")


def _img_rule(which: str):  # type: ignore[no-untyped-def]
    def rule(ctx: Context):  # type: ignore[no-untyped-def]
        pl = _pl()
        c = ctx.cfg.image
        w, h = pl.col("img_w"), pl.col("img_h")
        if which == "unreadable":
            return ~pl.col("img_ok"), pl.col("img_error")
        if which == "small":
            return pl.min_horizontal(w, h) < c.min_side, pl.format(f"image is {{}}x{{}} (min side {c.min_side})", w, h)
        if which == "large":
            return (w * h) > c.max_pixels, pl.format(f"image is {{}}x{{}} (max {c.max_pixels} pixels)", w, h)
        ratio = pl.max_horizontal(w, h) / pl.min_horizontal(w, h).clip(lower_bound=1)
        return ratio >= c.max_aspect, pl.format(f"aspect ratio {{}} (must be < {c.max_aspect})", ratio.round(1))

    return rule


def _exact_image(ctx: Context, alive: np.ndarray) -> dict[int, str]:
    df = ctx.df.select("_img_id", "kind", "_tdig", "id")[alive]
    first = first_of_groups_cols(df["_img_id"].to_numpy(), (df["kind"] == "qa").to_numpy(), df["_tdig"].to_numpy())
    dup = np.flatnonzero(first != np.arange(len(first)))
    ids = df["id"].gather(first[dup]).to_list()
    return {int(alive[j]): f"same text as {i} for the same image" for j, i in zip(dup, ids)}


def _exact_global(ctx: Context, alive: np.ndarray) -> dict[int, str]:
    kind_col = ctx.df["kind"].to_numpy()
    sel = alive[np.isin(kind_col[alive], list(set(ctx.cfg.exact.global_kinds)))]
    if len(sel) < 2:
        return {}
    df = ctx.df.select("kind", "_tdig", "id", "parent_id")[sel]
    first = first_of_groups_cols((df["kind"] == "qa").to_numpy(), df["_tdig"].to_numpy())
    dup = np.flatnonzero(first != np.arange(len(first)))
    ids = df["id"].gather(first[dup]).to_list()
    par = df["parent_id"].gather(first[dup]).to_list()
    return {int(sel[j]): f"same text as {i} (image of {p})" for j, i, p in zip(dup, ids, par)}


def _near(ctx: Context, alive: np.ndarray) -> dict[int, str]:
    from .dedup import _subset

    c = ctx.cfg.near
    kind_col = ctx.df["kind"].to_numpy()
    sel = alive[np.isin(kind_col[alive], list(c.kinds))]
    if len(sel) < 2:
        return {}
    flat, off = _subset(*ctx.words, sel)  # type: ignore[misc]
    res = near_duplicates(flat, off, shingle=c.shingle, num_perm=c.num_perm, bands=c.bands, threshold=c.threshold,
                          seed=c.seed, max_bucket_pairs=c.max_bucket_pairs)
    ctx.stats["near"] = {"candidates": res.candidates, "pairs_checked": res.pairs_checked,
                         "pairs_linked": res.pairs_linked}
    ids = ctx.df["id"].to_list()
    out = {}
    for j in np.flatnonzero(res.rep != np.arange(len(sel))):
        keep = int(sel[res.rep[j]])
        out[int(sel[j])] = f"near-duplicate of {ids[keep]} (shingle Jaccard {res.similarity[j]:.2f} with a row of its cluster)"
    return out


def _image_near(ctx: Context, alive: np.ndarray) -> dict[int, str]:
    pl = _pl()
    sub = ctx.df[alive].select("_img", "img_phash", "parent_id").with_row_index("_j")
    imgs = sub.unique("_img", keep="first", maintain_order=True).filter(pl.col("img_phash") != 0)
    if imgs.height < 2:
        return {}
    rep = phash_clusters(imgs["img_phash"].to_numpy(), ctx.cfg.image.phash_distance)
    keys = imgs["_img"].to_list()
    parents = imgs["parent_id"].to_list()
    dropped = {keys[i]: f"image is a pHash near-duplicate of the image of {parents[r]}"
               for i, r in enumerate(rep) if r != i}
    if not dropped:
        return {}
    out = {}
    for j, k in enumerate(sub["_img"].to_list()):
        if k in dropped:
            out[int(alive[j])] = dropped[k]
    return out


def _decontam_image(ctx: Context, alive: np.ndarray) -> dict[int, str]:
    from .decontam import image_matches

    sub = ctx.df[alive].select("_img", "img_phash")
    imgs = sub.unique("_img", keep="first", maintain_order=True)
    hits = image_matches(ctx.eval_index, imgs["img_phash"].to_numpy(), ctx.cfg.decontam.image_distance)
    if not hits:
        return {}
    bad = {imgs["_img"][i]: lab for i, lab in hits.items()}
    out = {}
    for j, k in enumerate(sub["_img"].to_list()):
        if k in bad:
            out[int(alive[j])] = f"image matches eval image of {bad[k]}"
    return out


def _decontam_text(ctx: Context, alive: np.ndarray) -> dict[int, str]:
    from .decontam import text_matches
    from .dedup import _subset

    c = ctx.cfg.decontam
    flat, off = _subset(*ctx.words, alive)  # type: ignore[misc]
    hits = text_matches(ctx.eval_index, flat, off, c.ngram, c.threshold)
    return {int(alive[j]): f"text covers {s:.2f} of the {c.ngram}-grams of eval text {lab}" for j, (lab, s) in hits.items()}


def _invalid_rule(ctx: Context):  # type: ignore[no-untyped-def]
    pl = _pl()
    return pl.col("_invalid").is_not_null(), pl.col("_invalid")


STEPS: list[Step] = [
    Step("invalid_record", "the row is not a valid SynthRecord (unknown kind, meta not a JSON object, ...)",
         expr=_invalid_rule),
    Step("image_unreadable", "the image is missing or cannot be decoded", expr=_img_rule("unreadable"),
         enabled=lambda c: c.image.enabled),
    Step("image_too_small", "shorter side below image.min_side", expr=_img_rule("small"),
         enabled=lambda c: c.image.enabled),
    Step("image_too_large", "more pixels than image.max_pixels (bomb guard)", expr=_img_rule("large"),
         enabled=lambda c: c.image.enabled),
    Step("image_aspect", "long/short side ratio at or above image.max_aspect", expr=_img_rule("aspect"),
         enabled=lambda c: c.image.enabled),
    Step("length", "caption/question/answer word count outside its bounds", expr=_length_rule),
    Step("refusal", "a refusal pattern matched", expr=_pattern_rule("refusal_patterns")),
    Step("hedge", "a hedge pattern matched", expr=_pattern_rule("hedge_patterns")),
    Step("meta_talk", "a meta-talk pattern matched", expr=_pattern_rule("meta_patterns")),
    Step("repetition_share", "too many repeated n-grams", expr=_repeat_share_rule),
    Step("repetition_run", "a unit repeated back-to-back too often", expr=_repeat_run_rule),
    Step("qa_copy", "the answer restates the question", expr=_qa_copy_rule),
    Step("qa_form", "the question is not phrased as a question", expr=_qa_form_rule,
         enabled=lambda c: c.qa.check_question_form),
    Step("exact_dup_image", "same text as an earlier row for the same image", group=_exact_image,
         enabled=lambda c: c.exact.enabled),
    Step("exact_dup_global", "same text as an earlier row (any image; exact.global_kinds)", group=_exact_global,
         enabled=lambda c: c.exact.enabled),
    Step("near_dup", "MinHash near-duplicate of an earlier row (near.kinds)", group=_near,
         enabled=lambda c: c.near.enabled),
    Step("image_near_dup", "the image is a pHash near-duplicate of an earlier row's image", group=_image_near,
         enabled=lambda c: c.image.enabled and c.image.dedup),
    Step("decontam_image", "the image matches an evaluation image", group=_decontam_image,
         enabled=lambda c: c.decontam.image),
    Step("decontam_text", "the text overlaps an evaluation query/target", group=_decontam_text,
         enabled=lambda c: c.decontam.text),
]
RULES = [s.name for s in STEPS]


# ---------------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------------
def load_frame(ds: ShardDataset, cfg: CurationConfig, progress: Any = None):  # type: ignore[no-untyped-def]
    """One row per synthetic record: ids, normalised text fields, image key + image features."""
    pl = _pl()
    cols = ["id", "parent_id", "source", "kind", "caption", "question", "answer", "key"]
    df = ds.scan().select(cols).with_row_index("_row").collect()
    df = df.with_columns(record_problems(ds), pl.col("kind").fill_null(""), pl.col("id").fill_null(""))
    if cfg.text.normalize:
        df = df.with_columns(normalize_series(df[c]).alias(c) for c in ("caption", "question", "answer"))
    df = df.with_columns(
        text=pl.when(pl.col("kind") == "qa")
        .then(pl.concat_str([pl.col("question").fill_null(""), pl.col("answer").fill_null("")], separator=" "))
        .otherwise(pl.col("caption").fill_null("")),
    )

    # image keys (content digest) and features, once per distinct image: per shard, Arrow finds the
    # distinct byte strings (hash-based, in C++) and only those are digested and analysed
    import pyarrow.compute as pc

    table = ImageTable(max_pixels=cfg.image.max_pixels)
    key_ids: dict[str, int] = {}
    keys_l: list[np.ndarray] = []
    ids_l: list[np.ndarray] = []
    task = progress.add_task("images", total=len(ds)) if progress else None
    for f in ds.files:
        col = ds._open(f).read_all().column("image")
        raw = pc.struct_field(col, "bytes")
        paths = pc.struct_field(col, "path")
        uniq = pc.unique(raw)
        idx = pc.index_in(raw, value_set=uniq, skip_nulls=True).to_numpy(zero_copy_only=False)
        ukeys = []
        for b in uniq.to_pylist():
            if b is None:
                ukeys.append(None)
                continue
            k = xxhash.xxh3_128_hexdigest(b)
            if k not in key_ids:
                key_ids[k] = len(key_ids)
                table.add(k, {"bytes": b, "path": None}, ds.path)
            ukeys.append(k)
        row_keys = np.array(ukeys + [None], dtype=object)[np.nan_to_num(idx, nan=len(ukeys)).astype(np.int64)]
        if raw.null_count:
            for j in np.flatnonzero(pd_isnull(row_keys)):
                p = paths[int(j)].as_py()
                k = "path:" + (p or "")
                if k not in key_ids:
                    key_ids[k] = len(key_ids)
                    table.add(k, {"bytes": None, "path": p}, ds.path)
                row_keys[j] = k
        keys_l.append(row_keys)
        ids_l.append(np.fromiter((key_ids[k] for k in row_keys), dtype=np.int64, count=len(row_keys)))
        if progress:
            progress.advance(task, len(row_keys))
    keys = np.concatenate(keys_l) if keys_l else np.zeros(0, dtype=object)
    df = df.with_columns(pl.Series("_img", keys.tolist(), dtype=pl.String),
                         pl.Series("_img_id", np.concatenate(ids_l) if ids_l else np.zeros(0, dtype=np.int64)))
    df = df.join(table.frame(), on="_img", how="left", maintain_order="left")
    return df, len(table.infos)


def text_features(df, cfg: CurationConfig, progress: Any = None):  # type: ignore[no-untyped-def]
    """Word hashes of ``text`` (flat + offsets), word counts per field and the repetition features."""
    pl = _pl()
    flats, lens = [], []
    share_l, count_l, run_l, a_l = [], [], [], []
    n = df.height
    task = progress.add_task("text features", total=n) if progress else None
    for s in range(0, max(n, 1), cfg.batch_rows):
        part = df.slice(s, cfg.batch_rows)
        f, o = word_hashes(part["text"])
        flats.append(f)
        n_all = np.diff(o)
        lens.append(n_all)
        is_qa = (part["kind"] == "qa").to_numpy()
        a_w = np.diff(word_hashes(part["answer"])[1]) if is_qa.any() else np.zeros(part.height, dtype=np.int64)
        a_w = np.where(is_qa, np.minimum(a_w, n_all), 0)
        a_l.append(a_w)
        # repetition is judged on the caption, or on the answer of a QA row: the answer's words are the
        # last ``a_words`` words of ``text`` (= question + " " + answer)
        n_rep = np.where(is_qa, a_w, n_all)
        rf, ro = tail_words(f, o, n_rep)
        sh, cnt = repeated_share(rf, ro, cfg.repetition.ngram)
        share_l.append(sh)
        count_l.append(cnt)
        run_l.append(longest_repeat(rf, ro))
        if progress:
            progress.advance(task, part.height)
    flat = np.concatenate(flats) if flats else np.zeros(0, dtype=np.uint64)
    ln = np.concatenate(lens) if lens else np.zeros(0, dtype=np.int64)
    a_words = np.concatenate(a_l) if a_l else np.zeros(0, dtype=np.int64)
    off = np.zeros(len(ln) + 1, dtype=np.int64)
    np.cumsum(ln, out=off[1:])
    is_qa = (df["kind"] == "qa").to_numpy()
    tdig = text_digests(df["text"].str.to_lowercase().to_list())  # exact-duplicate key (stable xxh3-64)
    df = df.with_columns(
        pl.Series("_tdig", tdig),
        pl.Series("cap_words", np.where(is_qa, 0, ln).astype(np.int64)),
        pl.Series("q_words", np.where(is_qa, ln - a_words, 0).astype(np.int64)),
        pl.Series("a_words", a_words.astype(np.int64)),
        pl.Series("rep_share", np.concatenate(share_l) if share_l else np.zeros(0)),
        pl.Series("rep_ngrams", np.concatenate(count_l) if count_l else np.zeros(0, dtype=np.int64)),
        pl.Series("rep_run", np.concatenate(run_l) if run_l else np.zeros(0, dtype=np.int64)),
    )
    return df, (flat, off)


def tail_words(flat: np.ndarray, offsets: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The last ``n[i]`` words of each row."""
    new_off = np.zeros(len(n) + 1, dtype=np.int64)
    np.cumsum(n, out=new_off[1:])
    if new_off[-1] == 0:
        return np.zeros(0, dtype=np.uint64), new_off
    starts = offsets[1:] - n
    idx = np.repeat(starts - new_off[:-1], n) + np.arange(new_off[-1], dtype=np.int64)
    return flat[idx], new_off


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------
def apply_steps(ctx: Context, steps: list[Step] | None = None, timings: dict[str, float] | None = None) -> None:
    """Run the steps in order over ``ctx.df``, filling ``_reason``/``_detail`` (first failing rule wins)."""
    pl = _pl()
    steps = STEPS if steps is None else steps
    df = ctx.df
    if REASON not in df.columns:
        df = df.with_columns(pl.lit(None, dtype=pl.String).alias(REASON), pl.lit(None, dtype=pl.String).alias(DETAIL))
    lf = df.lazy()
    pending = False
    for step in steps:
        if not step.enabled(ctx.cfg):
            continue
        if step.group is not None and step.name.startswith("decontam") and ctx.eval_index is None:
            continue
        t0 = time.perf_counter()
        if step.expr is not None:
            ctx.df = df
            cond, detail = step.expr(ctx)
            hit = pl.col(REASON).is_null() & cond.fill_null(False)
            lf = lf.with_columns(
                pl.when(hit).then(pl.lit(step.name)).otherwise(pl.col(REASON)).alias(REASON),
                pl.when(hit).then(detail.cast(pl.String)).otherwise(pl.col(DETAIL)).alias(DETAIL),
            )
            pending = True
        else:
            if pending:
                df = lf.collect()
                pending = False
            alive = np.flatnonzero(df[REASON].is_null().to_numpy())
            ctx.df = df
            hits = step.group(ctx, alive) if len(alive) else {}  # type: ignore[misc]
            if hits:  # alive rows only, so nothing is overwritten
                rows = pl.Series(np.fromiter(hits.keys(), dtype=np.int64, count=len(hits)))
                df = df.with_columns(
                    df[REASON].scatter(rows, step.name),
                    df[DETAIL].scatter(rows, pl.Series(list(hits.values()), dtype=pl.String)),
                )
            lf = df.lazy()
        if timings is not None:
            timings[step.name] = round(time.perf_counter() - t0, 3)
    ctx.df = lf.collect() if pending else df


def _quarantine_row(reason: str, detail: str, row: dict[str, Any], payload: str, meta: dict[str, Any]) -> dict[str, Any]:
    """A ``QuarantineRecord`` row (same id and layout as ``to_row(QuarantineRecord(...))``, without
    building the pydantic model per row)."""
    record_id, key = row.get("id") or "", row.get("key") or ""
    return {
        "id": content_id("QuarantineRecord", "curate", reason, record_id, key, ""),
        "stage": "curate",
        "reason": reason,
        "detail": detail or "",
        "record_id": record_id,
        "key": key,
        "parent_id": row.get("parent_id") or "",
        "raw": "",
        "payload": payload,
        "meta": canonical_json(meta),
    }


def synth_payload(row: dict[str, Any]) -> str:
    """``payload_json(SynthRecord)`` computed from its Arrow row (image bytes -> digest)."""
    out = dict(row)
    img = out.get("image")
    if img is not None:
        out["image"] = {"digest": digest(img["bytes"]) if img.get("bytes") is not None else None,
                        "path": img.get("path")}
    m = out.get("meta")
    out["meta"] = json.loads(m) if m else {}
    return canonical_json(out)


def _js(v: Any) -> str:
    """A JSON scalar exactly as ``canonical_json`` writes it."""
    if v is None:
        return "null"
    if v.__class__ is str:
        return _enc(v)
    return canonical_json(v)


def synth_payloads(tab) -> list[str]:  # type: ignore[no-untyped-def]
    """:func:`synth_payload` for every row of an Arrow table of SynthRecords, column-wise (no per-row dicts)."""
    c = {name: tab.column(name).to_pylist() for name in
         ("answer", "caption", "id", "key", "kind", "meta", "params_hash", "parent_id", "question", "source")}
    img = tab.column("image")
    import pyarrow.compute as pc

    img_b = pc.struct_field(img, "bytes").to_pylist()
    img_p = pc.struct_field(img, "path").to_pylist()
    teacher = tab.column("teacher").to_pylist()
    template = tab.column("template").to_pylist()
    out = []
    js = _js
    dig: dict[bytes, str] = {}
    for (ans, cap, id_, key, kind, m, ph, par, q, src), b, p, t, tp in zip(
        zip(c["answer"], c["caption"], c["id"], c["key"], c["kind"], c["meta"], c["params_hash"], c["parent_id"],
            c["question"], c["source"]),
        img_b, img_p, teacher, template,
    ):
        if not m or m == "{}":
            meta = "{}"
        else:
            try:
                meta = canonical_json(json.loads(m))
            except ValueError:  # an invalid_record row: keep what was stored, as a JSON string
                meta = js(m)
        if b is None:
            d = "null"
        else:
            d = dig.get(b)
            if d is None:
                d = dig[b] = '"' + digest(b) + '"'
        out.append(
            f'{{"answer":{js(ans)},"caption":{js(cap)},"id":{js(id_)},"image":{{"digest":{d},"path":{js(p)}}},'
            f'"key":{js(key)},"kind":{js(kind)},"meta":{meta},"params_hash":{js(ph)},"parent_id":{js(par)},'
            f'"question":{js(q)},"source":{js(src)},'
            + ('"teacher":null,' if t is None else
               f'"teacher":{{"backend":{js(t["backend"])},"model":{js(t["model"])},"revision":{js(t["revision"])}}},')
            + ('"template":null}' if tp is None else f'"template":{{"hash":{js(tp["hash"])},"name":{js(tp["name"])}}}}}')
        )
    return out


def quarantine_table(reasons: list[str], details: list[str], record_ids: list[str], keys: list[str],
                     parents: list[str], payloads: list[str], metas: list[str]):  # type: ignore[no-untyped-def]
    """QuarantineRecord rows (stage "curate") as an Arrow table, ids as ``QuarantineRecord`` computes them."""
    import pyarrow as pa
    from json.encoder import encode_basestring as enc

    record_ids = [i or "" for i in record_ids]  # an invalid_record row may lack them
    keys = [k or "" for k in keys]
    parents = [p or "" for p in parents]
    ids = [xxhash.xxh3_128_hexdigest(f'["QuarantineRecord","curate",{enc(r)},{enc(i)},{enc(k)},""]'.encode())
           for r, i, k in zip(reasons, record_ids, keys)]
    n = len(ids)
    return pa.table({
        "id": ids, "stage": ["curate"] * n, "reason": reasons, "detail": details, "record_id": record_ids,
        "key": keys, "parent_id": parents, "raw": [""] * n, "payload": payloads, "meta": metas,
    })


@dataclass
class CurationResult:
    report: dict[str, Any]
    kept: int
    rejected: int


def _examples(df, reason: str, k: int) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    pl = _pl()
    sub = df.filter(pl.col(REASON) == reason).head(k)
    return [{"record_id": r["id"], "detail": r[DETAIL], "text": (r["text"] or "")[:160]}
            for r in sub.select("id", DETAIL, "text").iter_rows(named=True)]


def decontaminate_original(ws: Workspace, cfg: CurationConfig, eval_index: Any, max_pixels: int,
                           progress: Any = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Contaminated original PairRecords -> quarantine rows (``meta.input = "original"``)."""
    from .decontam import image_matches, text_matches
    from .images import analyse_image, read_ref_bytes

    if not ws.original.exists():
        return [], {"rows": 0, "note": f"{ws.original} does not exist: nothing to decontaminate"}
    ds = open_checked(ws.original, "PairRecord", "original data")
    n = len(ds)
    hits: dict[int, tuple[str, str]] = {}
    c = cfg.decontam
    if c.text and n:
        df = ds.scan().select("qry_text", "pos_text", "neg_text").collect()
        for col in ("qry_text", "pos_text", "neg_text"):
            f, o = word_hashes(df[col].fill_null(""))
            for r, (lab, s) in text_matches(eval_index, f, o, c.ngram, c.threshold).items():
                hits.setdefault(r, ("decontam_text", f"{col} covers {s:.2f} of the {c.ngram}-grams of eval text {lab}"))
    if c.image and n and len(eval_index.image_hashes):
        phash: dict[str, int] = {}
        row_keys: list[list[str]] = []
        task = progress.add_task("original images", total=n) if progress else None
        for _, _, batch in ds.iter_batches(columns=["qry_image", "pos_image", "neg_image"]):
            cols = [batch.column(i).to_pylist() for i in range(3)]
            for refs in zip(*cols):
                ks = []
                for ref in refs:
                    k = image_key(ref)
                    if k is None:
                        continue
                    if k not in phash:
                        data, _err = read_ref_bytes(ref, ds.path)
                        phash[k] = analyse_image(data, max_pixels).phash if data is not None else 0
                    ks.append(k)
                row_keys.append(ks)
            if progress:
                progress.advance(task, batch.num_rows)
        keys = list(phash)
        m = image_matches(eval_index, np.array([phash[k] for k in keys], dtype=np.uint64), c.image_distance)
        bad = {keys[i]: lab for i, lab in m.items()}
        for r, ks in enumerate(row_keys):
            for k in ks:
                if k in bad and r not in hits:
                    hits[r] = ("decontam_image", f"image matches eval image of {bad[k]}")
    rows_out: list[dict[str, Any]] = []
    by_rule: dict[str, int] = {}
    if hits:
        wanted = sorted(hits)
        t = ds.table().take(pa_indices(wanted))
        for r, row in zip(wanted, t.to_pylist()):
            rec = from_row("PairRecord", row, where=f"{ds.path} row {r}")
            reason, detail = hits[r]
            by_rule[reason] = by_rule.get(reason, 0) + 1
            rows_out.append(_quarantine_row(reason, detail, {"id": rec.id}, payload_json(rec),
                                            {"input": "original", "source": rec.source}))
    return rows_out, {"rows": n, "rejected": len(rows_out), "by_rule": by_rule}


def pa_indices(idx: list[int] | np.ndarray):  # type: ignore[no-untyped-def]
    import pyarrow as pa

    return pa.array(np.asarray(idx, dtype=np.int64))


def run_curation(
    data: str | Path = "shards",
    config: CurationConfig | None = None,
    eval_data: str | Path | None = None,
    show_progress: bool = True,
    console: Any = None,
) -> CurationResult:
    """Curate ``DATA/synthetic`` into ``DATA/curated`` (see the module docstring).

    Holds the workspace lock for the whole run; ``curated/`` is rebuilt beside the old one and swapped in
    when complete (:mod:`cocoa.curation.output`).
    """
    from .output import workspace_lock

    ws = Workspace(data)
    with workspace_lock(ws.root, "cocoa-data curate", f"there is no {ws.synthetic} to curate; run `cocoa-data synth "
                        f"--out {ws.root}` first"):
        return _run_curation(ws, config or CurationConfig(), eval_data, show_progress, console)


def quarantine_summary(path: Path, top: int = 5) -> tuple[int, list[tuple[str, int]]] | None:
    """(rows, [(reason, count), ...] most frequent first) of a QuarantineRecord dataset, or None if unreadable."""
    pl = _pl()
    try:
        q = open_dataset(path, record_type="QuarantineRecord", verify=False)
        counts = q.scan().group_by("reason").len().sort(["len", "reason"], descending=[True, False]).collect()
    except (CocoaError, OSError, pl.exceptions.PolarsError):
        return None
    return len(q), [(r, int(n)) for r, n in counts.head(top).iter_rows()]


def _no_rows_message(ws: Workspace) -> str:
    qs = quarantine_summary(ws.quarantine) if (ws.quarantine / MANIFEST).is_file() else None
    if qs and qs[0]:
        n, top = qs
        reasons = ", ".join(f"{r} {c}" for r, c in top)
        return (f"{ws.synthetic} has no rows: every teacher output of the synth run failed validation ({n} rows "
                f"quarantined in {ws.quarantine}; top reasons: {reasons}). See them with `cocoa-data inspect "
                f"{ws.quarantine}`, fix the teacher, model or prompts and rerun `cocoa-data synth`; or train stages "
                "1-2 on original pairs only: `cocoa-data mix --ratio 1:0`")
    return (f"{ws.synthetic} has no rows and nothing was quarantined: the synth run had no input pairs. Check "
            f"{ws.original} and rerun `cocoa-data synth`, or train stages 1-2 on original pairs only: "
            "`cocoa-data mix --ratio 1:0`")


def _run_curation(ws: Workspace, cfg: CurationConfig, eval_data: str | Path | None, show_progress: bool,
                  console: Any) -> CurationResult:
    from .output import check_replaceable, staged_output

    pl = _pl()
    t_start = time.perf_counter()
    ds = open_checked(ws.synthetic, "SynthRecord", "synthetic data",
                      f"run `cocoa-data synth --out {ws.root}` first (it writes {ws.synthetic})")
    if len(ds) == 0:
        raise ShardError(_no_rows_message(ws))
    check_replaceable(ws.curated, "cocoa-data curate")  # refuse a foreign curated/ before any work
    timings: dict[str, float] = {}
    progress = make_progress(console, show_progress)
    with progress:
        t0 = time.perf_counter()
        df, n_images = load_frame(ds, cfg, progress)
        timings["load+images"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        df, words = text_features(df, cfg, progress)
        timings["text_features"] = round(time.perf_counter() - t0, 3)
        eval_index = None
        if eval_data is not None:
            from .decontam import build_eval_index

            t0 = time.perf_counter()
            eval_index = build_eval_index(eval_data, cfg.decontam.ngram, cfg.image.max_pixels,
                                          cfg.decontam.template_texts)
            timings["eval_index"] = round(time.perf_counter() - t0, 3)
        ctx = Context(cfg=cfg, df=df, words=words, eval_index=eval_index)
        steps_task = progress.add_task("rules", total=len(STEPS))
        step_times: dict[str, float] = {}
        for step in STEPS:  # one step at a time so the bar moves; state lives in ctx.df
            apply_steps(ctx, [step], step_times)
            progress.advance(steps_task)
        timings.update(step_times)
        df = ctx.df
        orig_rows: list[dict[str, Any]] = []
        orig_report: dict[str, Any] = {"note": "no --eval-data: original rows were not decontaminated"}
        if eval_index is not None:
            t0 = time.perf_counter()
            orig_rows, orig_report = decontaminate_original(ws, cfg, eval_index, cfg.image.max_pixels, progress)
            timings["decontam_original"] = round(time.perf_counter() - t0, 3)

    # --- write curated/ and curated/rejected/ -----------------------------------------------------
    t0 = time.perf_counter()
    reasons = df[REASON].to_numpy()
    keep_idx = np.flatnonzero(pd_isnull(reasons))
    rej_idx = np.flatnonzero(~pd_isnull(reasons))
    in_ck = dataset_checksum(ws.synthetic)
    prov = {"stage": "curate", "input": in_ck, "config": cfg.model_dump(mode="json"),
            "eval_data": None if eval_data is None else str(eval_data)}
    table = ds.table()
    kept = table.take(pa_indices(keep_idx))
    if cfg.text.normalize:
        import pyarrow as pa

        sub = df[keep_idx] if len(keep_idx) else df.head(0)
        for c in ("caption", "question", "answer"):
            kept = kept.set_column(kept.schema.get_field_index(c), c, pa.array(sub[c].to_list(), type=pa.string()))
    with staged_output(ws.curated, "curated", "cocoa-data curate") as stage:  # swapped in when complete
        _write_outputs(stage, prov, kept, table, df, reasons, rej_idx, orig_rows)
        timings["write"] = round(time.perf_counter() - t0, 3)
        report = _report(ws, df, ctx, cfg, eval_data, eval_index, orig_report, in_ck, keep_idx, rej_idx, n_images,
                         timings, t_start)
        atomic_write_json(stage / "report.json", report)
    return CurationResult(report=report, kept=int(len(keep_idx)), rejected=int(len(rej_idx)) + len(orig_rows))


def _write_outputs(stage: Path, prov: dict[str, Any], kept, table, df, reasons, rej_idx,  # type: ignore[no-untyped-def]
                   orig_rows: list[dict[str, Any]]) -> None:
    with ShardWriter(stage, "SynthRecord", mode="create", provenance=prov) as w:
        w.write_table(kept)
    with ShardWriter(stage / "rejected", "QuarantineRecord", mode="create", provenance=prov) as w:
        det = df[DETAIL]
        for s in range(0, len(rej_idx), 20_000):
            part = rej_idx[s:s + 20_000]
            tab = table.take(pa_indices(part))
            kinds, sources = tab.column("kind").to_pylist(), tab.column("source").to_pylist()
            w.write_table(quarantine_table(
                [str(reasons[r]) for r in part], [d or "" for d in det.gather(part).to_list()],
                tab.column("id").to_pylist(), tab.column("key").to_pylist(), tab.column("parent_id").to_pylist(),
                synth_payloads(tab),
                [canonical_json({"input": "synthetic", "kind": k, "source": so}) for k, so in zip(kinds, sources)],
            ))
        for row in orig_rows:
            w.write_row(row)


def _report(ws: Workspace, df, ctx: Context, cfg: CurationConfig, eval_data, eval_index,  # type: ignore[no-untyped-def]
            orig_report: dict[str, Any], in_ck: dict[str, Any], keep_idx, rej_idx, n_images: int,
            timings: dict[str, float], t_start: float) -> dict[str, Any]:
    pl = _pl()
    counts = df.group_by(REASON).len().filter(pl.col(REASON).is_not_null())
    by_rule = dict(zip(counts[REASON].to_list(), counts["len"].to_list()))
    kinds_in = dict(df.group_by("kind").len().sort("kind").iter_rows())
    kinds_out = dict(df.filter(pl.col(REASON).is_null()).group_by("kind").len().sort("kind").iter_rows())
    drops = {
        s.name: {"count": int(by_rule.get(s.name, 0)), "rule": s.doc,
                 "examples": _examples(df, s.name, cfg.examples) if by_rule.get(s.name) else []}
        for s in STEPS
    }
    report = {
        "input": in_ck,
        "rows_in": df.height,
        "rows_out": int(len(keep_idx)),
        "rows_rejected": int(len(rej_idx)),
        "kinds_in": kinds_in,
        "kinds_out": kinds_out,
        "distinct_images": n_images,
        "drops": drops,
        "near_dup": ctx.stats.get("near", {}),
        "decontamination": {
            "eval_data": None if eval_data is None else str(eval_data),
            "eval_index": eval_index.summary() if eval_index is not None else None,
            "original": orig_report,
        },
        "config": cfg.model_dump(mode="json"),
        "timings_s": timings,
        "total_s": round(time.perf_counter() - t_start, 3),
        "outputs": {"curated": str(ws.curated), "rejected": str(ws.rejected)},
    }
    return report


def make_progress(console: Any = None, show: bool = True):  # type: ignore[no-untyped-def]
    """A rich progress bar with count, rate and ETA."""
    from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    from ..progress import Progress  # a live bar on a terminal, plain periodic lines in logs and pipes

    class Rate(ProgressColumn):
        def render(self, task):  # type: ignore[no-untyped-def]
            return Text(f"{task.speed:,.0f}/s" if task.speed else "")

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
                    TimeRemainingColumn(), console=console, disable=not show)


def pd_isnull(a: np.ndarray) -> np.ndarray:
    return np.array([x is None for x in a], dtype=bool) if a.dtype == object else np.zeros(len(a), dtype=bool)


def print_report(report: dict[str, Any], console: Any = None) -> None:
    """The rich table of rows in/out and drops per rule with an example each."""
    from rich.console import Console
    from rich.table import Table

    con = console or Console()
    t = Table(title=f"curate: {report['rows_in']} rows in, {report['rows_out']} out, "
                    f"{report['rows_rejected']} rejected")
    t.add_column("rule")
    t.add_column("dropped", justify="right")
    t.add_column("example")
    for name, d in report["drops"].items():
        ex = d["examples"][0] if d["examples"] else None
        t.add_row(name, str(d["count"]), "" if ex is None else f"{ex['detail']} | {ex['text'][:60]}")
    orig = report["decontamination"]["original"]
    if orig.get("rejected") is not None:
        t.add_row("original (decontam)", str(orig.get("rejected", 0)), json.dumps(orig.get("by_rule", {})))
    con.print(t)
    if report["decontamination"]["eval_data"] is None:
        con.print("[yellow]no --eval-data given: nothing was decontaminated against evaluation data[/yellow]")


__all__ = ["STEPS", "RULES", "Step", "Context", "apply_steps", "run_curation", "print_report", "open_checked",
           "dataset_checksum"]
