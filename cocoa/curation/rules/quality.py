"""Text quality rules: ``length``, ``refusal``, ``hedge``, ``meta_talk``, ``repetition_share``,
``repetition_run``, ``qa_copy``, ``qa_form`` (per-row Polars expressions over the word counts and
repetition features of :func:`cocoa.curation.frame.text_features`)."""

from __future__ import annotations

from ..steps import Context, Step, _pl
from ..text import WORD_RE, combined_pattern


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


STEPS = [
    Step("length", "caption/question/answer word count outside its bounds", expr=_length_rule),
    Step("refusal", "a refusal pattern matched", expr=_pattern_rule("refusal_patterns")),
    Step("hedge", "a hedge pattern matched", expr=_pattern_rule("hedge_patterns")),
    Step("meta_talk", "a meta-talk pattern matched", expr=_pattern_rule("meta_patterns")),
    Step("repetition_share", "too many repeated n-grams", expr=_repeat_share_rule),
    Step("repetition_run", "a unit repeated back-to-back too often", expr=_repeat_run_rule),
    Step("qa_copy", "the answer restates the question", expr=_qa_copy_rule),
    Step("qa_form", "the question is not phrased as a question", expr=_qa_form_rule,
         enabled=lambda c: c.qa.check_question_form),
]
