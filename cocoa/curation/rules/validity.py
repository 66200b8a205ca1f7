"""Rule ``invalid_record``: the row is not a valid SynthRecord although its shard has the right columns.

Its feature, :func:`record_problems`, is the ``SynthRecord`` contract computed column-wise.
"""

from __future__ import annotations

import json

from ...records import _check_relpath
from ...shards import ShardDataset
from ..steps import Context, Step, _pl


def _json_object_problem(text: str) -> str | None:
    try:
        v = json.loads(text)
    except ValueError as e:
        return f"meta is not valid JSON ({e})"
    return None if isinstance(v, dict) else f"meta is JSON but not an object (got {type(v).__name__})"


def _path_problem(path: str) -> str | None:
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
    return record_problems_frame(ds.scan())


def record_problems_frame(lf):  # type: ignore[no-untyped-def]
    """:func:`record_problems` of a Polars LazyFrame of SynthRecord rows (one block of a dataset: the
    result of a row depends on that row only)."""
    pl = _pl()
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

def _invalid_rule(ctx: Context):  # type: ignore[no-untyped-def]
    pl = _pl()
    return pl.col("_invalid").is_not_null(), pl.col("_invalid")


STEPS = [
    Step("invalid_record", "the row is not a valid SynthRecord (unknown kind, meta not a JSON object, ...)",
         expr=_invalid_rule),
]
