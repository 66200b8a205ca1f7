"""`cocoa-data mix`: ``original/`` + ``curated/`` -> ``mix/`` (MixRecord rows) at an original:synthetic ratio.

Row mapping (:func:`to_mix_record`; the training collators depend on it):

- synthetic caption -> image, prompt = :data:`CAPTION_PROMPT`, text = caption, stages [1, 2]
- synthetic QA -> image, prompt = question, text = answer, stages [1, 2]
- original pair with an image query and a text positive -> image = qry_image, prompt = qry_text,
  text = pos_text, stages [1, 2]
- original pair with a text query and an image positive -> image = pos_image, prompt = "",
  text = qry_text, stages [1, 2]
- other original pairs (no image, no text, or image -> image such as grounding, whose texts are
  instructions) -> not mixed; counted in the dataset card.

Stage 3 reads ``original/`` PairRecords directly, so no mix row claims stage 3.

Selection is deterministic: each candidate row gets the key ``xxh3_64(f"{seed}:{id}")``; a side
(stratified: each source of a side) takes the rows with the smallest keys. The output order is
by ``xxh3_64(f"{seed}:order:{id}:{copy}")``. Same inputs + seed -> byte-identical shard files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import xxhash

from ..records import ImageRef, MixRecord, PairRecord, RecordError, SynthRecord, canonical_json
from ..shards import ImageStore, ShardWriter, Workspace, atomic_write_json, atomic_write_text, open_dataset
from ..errors import CocoaError
from .inputs import dataset_checksum, open_checked, pa_indices

CAPTION_PROMPT = "Describe the image in detail."


class RatioError(ValueError):
    """A ``--ratio`` value that is not two non-negative numbers ``a:b``, at least one positive."""


def parse_ratio(text: str) -> tuple[float, float]:
    """``"1:1"`` -> ``(1.0, 1.0)``. Both parts are finite numbers >= 0 and at least one is positive.

    A zero side is an explicit choice: that side is not used (``1:0`` mixes original pairs only, so
    stages 1-2 can run without synthetic data; ``0:1`` curated synthetic rows only).
    """
    parts = str(text).strip().split(":")
    if len(parts) != 2:
        raise RatioError(f"--ratio must be two numbers original:synthetic such as 1:1, 2:1 or 1:0, not {text!r}")
    vals = []
    for p in parts:
        try:
            v = float(p)
        except ValueError:
            raise RatioError(f"--ratio {text!r}: {p!r} is not a number (use e.g. 1:1, 0.5:1 or 1:0)") from None
        if not math.isfinite(v) or v < 0:
            raise RatioError(f"--ratio {text!r}: each side must be a number >= 0 (got {p}); use e.g. 1:1, 2:1 or 1:0")
        if v == 0 and _nonzero(p):  # 1e-400 underflows to 0.0: it would silently switch that side off
            raise RatioError(f"--ratio {text!r}: {p.strip()} is too small to be a ratio part (it rounds to 0, which "
                             "leaves that side out); write 0 to leave a side out, or use e.g. 1:1000")
        vals.append(v)
    if vals[0] == 0 and vals[1] == 0:
        raise RatioError(f"--ratio {text!r} uses neither side; use e.g. 1:1, 1:0 (original only) or 0:1 "
                         "(synthetic only)")
    return vals[0], vals[1]


def _nonzero(text: str) -> bool:
    from decimal import Decimal, InvalidOperation

    try:
        return Decimal(text.strip()) != 0
    except InvalidOperation:
        return False


# ---------------------------------------------------------------------------------------------
# the mapping (pure)
# ---------------------------------------------------------------------------------------------
def to_mix_record(record: PairRecord | SynthRecord, image: ImageRef | None = None,
                  input_name: str = "") -> MixRecord | None:
    """Map one original or curated record to a mix row, or None when it cannot serve stages 1-2.

    ``image`` replaces the record's image (e.g. the same image as a reference into the image store, so the row
    does not depend on the input directory). ``input_name`` is recorded in ``meta`` (provenance).
    """
    if isinstance(record, SynthRecord):
        img = image or record.image
        meta = {"input": input_name or "curated", "record_id": record.id, "kind": record.kind,
                "parent_id": record.parent_id}
        if record.kind == "caption":
            return MixRecord(origin="synthetic", origin_id=record.id, source=record.source, stages=[1, 2],
                             image=img, prompt=CAPTION_PROMPT, text=record.caption or "", meta=meta)
        return MixRecord(origin="synthetic", origin_id=record.id, source=record.source, stages=[1, 2],
                         image=img, prompt=record.question or "", text=record.answer or "", meta=meta)
    kind = pair_kind(record)
    meta = {"input": input_name or "original", "record_id": record.id, "kind": kind}
    if kind == "image_to_text":
        return MixRecord(origin="original", origin_id=record.id, source=record.source, stages=[1, 2],
                         image=image or record.qry_image, prompt=record.qry_text, text=record.pos_text, meta=meta)
    if kind == "text_to_image":
        return MixRecord(origin="original", origin_id=record.id, source=record.source, stages=[1, 2],
                         image=image or record.pos_image, prompt="", text=record.qry_text, meta=meta)
    return None


def pair_kind(record: PairRecord) -> str:
    """``image_to_text``, ``text_to_image``, or why the pair cannot be mixed.

    A text positive is a positive without an image (a positive image's text is an instruction, as in
    MMEB); a text query is a query without an image.
    """
    if record.qry_image is not None and record.pos_image is None and record.pos_text.strip():
        return "image_to_text"
    if record.qry_image is None and record.qry_text.strip() and record.pos_image is not None:
        return "text_to_image"
    has_img = record.qry_image is not None or record.pos_image is not None
    has_txt = bool(record.qry_text.strip() or record.pos_text.strip())
    if not has_img:
        return "no_image"
    if not has_txt:
        return "no_text"
    return "image_to_image"  # e.g. grounding: image query -> image positive; its texts are instructions


# ---------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------
def _key(seed: int, *parts: Any) -> int:
    return xxhash.xxh3_64_intdigest(":".join([str(seed), *map(str, parts)]).encode())


def allocate(total: int, sizes: dict[str, int]) -> dict[str, int]:
    """Split ``total`` over groups proportionally to ``sizes`` (largest remainder, ties by name)."""
    n = sum(sizes.values())
    if n == 0 or total <= 0:
        return {k: 0 for k in sizes}
    exact = {k: Fraction(total * v, n) for k, v in sizes.items()}
    out = {k: int(math.floor(v)) for k, v in exact.items()}
    rest = total - sum(out.values())
    for k in sorted(sizes, key=lambda k: (-(exact[k] - out[k]), k))[:rest]:
        out[k] += 1
    return out


def take(ids: list[str], sources: list[str], n: int, seed: int, stratify: bool) -> list[tuple[int, int]]:
    """Pick ``n`` rows (with copies when ``n`` exceeds the rows: upsampling). Returns (index, copy)."""
    if n <= 0 or not ids:
        return []
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(sources if stratify else [""] * len(ids)):
        groups.setdefault(s, []).append(i)
    quota = allocate(n, {g: len(v) for g, v in groups.items()})
    out: list[tuple[int, int]] = []
    for g in sorted(groups):
        idx = sorted(groups[g], key=lambda i: (_key(seed, ids[i]), i))
        q = quota[g]
        full, rem = divmod(q, len(idx))
        for c in range(full):
            out += [(i, c) for i in idx]
        out += [(i, full) for i in idx[:rem]]
    return out


@dataclass
class MixPlan:
    n_original: int
    n_synthetic: int
    note: str


def plan_counts(avail_o: int, avail_s: int, a: float, b: float, upsample: bool,
                empty_hint: dict[str, str] | None = None) -> MixPlan:
    """How many original and synthetic rows to take for ratio a:b (cap the long side, or upsample).

    A zero part means that side is not used: every mixable row of the other side is taken.
    ``empty_hint`` (side -> text) explains an empty side in the error.
    """
    hints = {"original": "check original/ (`cocoa-data inspect` it)",
             "synthetic": "check curated/ and curated/report.json", **(empty_hint or {})}
    for which, avail, part in (("original", avail_o, a), ("synthetic", avail_s, b)):
        if part > 0 and avail == 0:
            other = "1:0" if which == "synthetic" else "0:1"
            raise RecordError(
                f"the {which} side has no mixable rows, so no {a:g}:{b:g} mixture exists: {hints[which]}; "
                f"or mix the other side only with --ratio {other}"
            )
    if b == 0:
        return MixPlan(avail_o, 0, f"original pairs only (--ratio {a:g}:0): all {avail_o} mixable original rows; "
                                   "no synthetic rows")
    if a == 0:
        return MixPlan(0, avail_s, f"synthetic rows only (--ratio 0:{b:g}): all {avail_s} curated rows; "
                                   "no original rows")
    ko, ks = avail_o / a, avail_s / b
    if math.isclose(ko, ks):
        return MixPlan(avail_o, avail_s, "both sides fit the ratio exactly")
    short = "original" if ko < ks else "synthetic"
    if upsample:
        k = max(ko, ks)
        n_o, n_s = round(k * a), round(k * b)
        note = (f"the {short} side is short ({avail_o if short == 'original' else avail_s} rows); "
                f"upsampled it to {n_o if short == 'original' else n_s} rows (rows repeat)")
    else:
        k = min(ko, ks)
        n_o, n_s = min(avail_o, math.floor(k * a + 1e-9)), min(avail_s, math.floor(k * b + 1e-9))
        long = "synthetic" if short == "original" else "original"
        note = (f"the {short} side is short ({avail_o if short == 'original' else avail_s} rows); "
                f"capped the {long} side to {n_s if long == 'synthetic' else n_o} of "
                f"{avail_s if long == 'synthetic' else avail_o} rows (pass --upsample to repeat the short side instead)")
    return MixPlan(max(n_o, 1), max(n_s, 1), note)


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------
def _excluded_originals(ws: Workspace) -> set[str]:
    """Original record ids that curation's decontamination rejected (in ``curated/rejected``)."""
    if not (ws.rejected / "manifest.json").is_file():
        return set()
    import polars as pl

    ds = open_dataset(ws.rejected, record_type="QuarantineRecord")
    df = ds.scan().select("record_id", "meta").collect()
    df = df.filter(pl.col("meta").str.contains('"input":"original"', literal=True))
    return set(df["record_id"].to_list())


def run_mix(data: str | Path = "shards", ratio: str = "1:1", stratify: bool = True, upsample: bool = False,
            seed: int = 0, show_progress: bool = True, console: Any = None) -> dict[str, Any]:
    """Write ``DATA/mix`` and its dataset card; returns the card's numbers.

    Holds the workspace lock; ``mix/`` is rebuilt beside the old one and swapped in when complete
    (:mod:`cocoa.curation.output`). A zero side of the ratio is not read at all.
    """
    from .output import workspace_lock

    a, b = parse_ratio(ratio)
    ws = Workspace(data)
    with workspace_lock(ws.root, "cocoa-data mix", "create it with `cocoa-data scenes --out DIR` or `cocoa-data synth "
                        "--source mmeb --out DIR`, then curate it"):
        return _run_mix(ws, a, b, stratify, upsample, seed, show_progress, console)


def _curated_empty_hint(ws: Workspace) -> str:
    import json

    try:
        rep = json.loads((ws.curated / "report.json").read_text(encoding="utf-8"))
        drops = sorted(((d["count"], r) for r, d in rep["drops"].items() if d["count"]), reverse=True)[:5]
        top = ", ".join(f"{r} {n}" for n, r in drops) or "none"
        return (f"curate kept 0 of the {rep['rows_in']} synthetic rows (top rules: {top}; see "
                f"{ws.curated / 'report.json'} and {ws.rejected})")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{ws.curated} has no rows (see {ws.rejected})"


def check_curated_current(ws: Workspace, synthetic: bool, original: bool) -> None:
    """Refuse a ``curated/`` that was not made from the current ``synthetic/`` (its rows are mixed) and
    ``original/`` (its decontamination rejections are left out of the original side).

    ``curate`` records both inputs' content checksums in ``curated/``'s provenance; a later synth run, a
    regenerated ``original/`` or a ``curated/`` copied from another workspace no longer match.
    """
    from ..shards import MANIFEST, read_manifest

    if not (ws.curated / MANIFEST).is_file():
        return
    prov = read_manifest(ws.curated).provenance or {}
    rerun = f"rerun `cocoa-data curate --data {ws.root}` (with the same --eval-data), then `cocoa-data mix`"
    if "input" not in prov or "original" not in prov:
        raise RecordError(f"{ws.curated} does not record the checksums of the synthetic/ and original/ it was made "
                          f"from (written by an older cocoa or by hand), so it cannot be matched to them: {rerun}")
    checks = ([("synthetic", ws.synthetic, prov.get("input"))] if synthetic else []) + (
        [("original", ws.original, prov.get("original"))] if original else [])
    for name, path, recorded in checks:
        current = dataset_checksum(path) if (path / MANIFEST).is_file() else None
        same = (recorded is None and current is None) or (
            isinstance(recorded, dict) and current is not None
            and recorded.get("content_sha256") == current["content_sha256"]
            and recorded.get("record_type") == current["record_type"])
        if not same:
            was = "nothing" if recorded is None else f"{recorded.get('rows')} rows" if isinstance(recorded, dict) \
                else "an unreadable record"
            now = "nothing" if current is None else f"{current['rows']} rows"
            raise RecordError(f"{ws.curated} was not made from the current {path} ({name} changed since "
                              f"`cocoa-data curate` ran: it recorded {was}, now {now}, different content): {rerun}")


def _run_mix(ws: Workspace, a: float, b: float, stratify: bool, upsample: bool, seed: int, show_progress: bool,
             console: Any) -> dict[str, Any]:
    from .output import check_replaceable, staged_output
    from .pipeline import make_progress

    orig = cur = None
    if a > 0:
        orig = open_checked(ws.original, "PairRecord", "original data",
                            f"create it first (`cocoa-data scenes --out {ws.root}` or `cocoa-data synth --source mmeb "
                            f"--out {ws.root}` write {ws.original}); or mix synthetic rows only with --ratio 0:1")
    if b > 0:
        cur = open_checked(ws.curated, "SynthRecord", "curated data",
                           f"run `cocoa-data curate --data {ws.root}` first (it filters {ws.synthetic}); or mix "
                           "original pairs only with --ratio 1:0")
    check_replaceable(ws.mix, "cocoa-data mix")  # refuse a foreign mix/ before any work
    check_curated_current(ws, synthetic=cur is not None, original=orig is not None)
    excluded = _excluded_originals(ws) if orig is not None else set()

    # candidates (light columns only), then the records actually taken
    o_ids, o_src, o_rows = [], [], []
    unmixable: dict[str, int] = {}
    n_excluded = 0
    try:
        for i, rec in enumerate(orig if orig is not None else []):
            if rec.id in excluded:
                n_excluded += 1
                continue
            k = pair_kind(rec)
            if k not in ("image_to_text", "text_to_image"):
                unmixable[k] = unmixable.get(k, 0) + 1
                continue
            o_ids.append(rec.id)
            o_src.append(rec.source)
            o_rows.append(i)
    except CocoaError as e:  # an invalid PairRecord: stage 3 reads original/ too, so it is an error, not a skip
        raise RecordError(f"{e}. {ws.original} must hold valid PairRecords (stage 3 trains on them as well): "
                          "regenerate it with the command that wrote it (`cocoa-data scenes`, `cocoa-data synth "
                          "--source mmeb`), or mix synthetic rows only with --ratio 0:1") from None
    s_ids: list[str] = []
    s_src: list[str] = []
    if cur is not None:
        s_df = cur.scan().select("id", "source").collect()
        s_ids, s_src = s_df["id"].to_list(), s_df["source"].to_list()

    plan = plan_counts(len(o_ids), len(s_ids), a, b, upsample, {"synthetic": _curated_empty_hint(ws)})
    pick_o = take(o_ids, o_src, plan.n_original, seed, stratify)
    pick_s = take(s_ids, s_src, plan.n_synthetic, seed, stratify)

    # materialise the picked rows
    o_table = orig.table() if orig is not None else None
    s_table = cur.table() if cur is not None else None
    entries: list[tuple[int, MixRecord]] = []
    store = ImageStore(ws.root)  # mix/ refers to the workspace's images; it holds no copies
    from ..records import from_row

    progress = make_progress(console, show_progress)
    with progress:
        task = progress.add_task("mix", total=len(pick_o) + len(pick_s))
        for side, picks, table, ds, rt, rows in (
            ("original", pick_o, o_table, orig, "PairRecord", o_rows),
            ("synthetic", pick_s, s_table, cur, "SynthRecord", None),
        ):
            if not picks:
                continue
            uniq = sorted({i for i, _ in picks})
            phys = [rows[i] for i in uniq] if rows is not None else uniq
            recs: dict[int, MixRecord] = {}
            for s in range(0, len(uniq), 10_000):
                part_u, part_p = uniq[s:s + 10_000], phys[s:s + 10_000]
                for u, pidx, row in zip(part_u, part_p, table.take(pa_indices(part_p)).to_pylist()):
                    rec = from_row(rt, row, where=f"{ds.path} row {pidx}")
                    img = _stored(rec, ds.path, store)
                    m = to_mix_record(rec, image=img, input_name=str(ds.path.name))
                    assert m is not None  # candidates were filtered by pair_kind
                    recs[u] = m
            for i, c in picks:
                m = recs[i]
                if c:
                    m = m.model_copy(update={"meta": {**m.meta, "copy": c}})
                entries.append((_key(seed, "order", side, m.origin_id, c), m))
                progress.advance(task)
    entries.sort(key=lambda e: (e[0], e[1].origin, e[1].origin_id))

    counts: dict[str, dict[str, int]] = {"original": {}, "synthetic": {}}
    for _, m in entries:
        counts[m.origin][m.source] = counts[m.origin].get(m.source, 0) + 1
    n_o, n_s = sum(counts["original"].values()), sum(counts["synthetic"].values())
    card = {
        "ratio_requested": f"{a:g}:{b:g}",
        "ratio_achieved": f"{n_o / n_s:.4f}:1" if n_s else "1:0",
        "rows": len(entries),
        "original_rows": n_o,
        "synthetic_rows": n_s,
        "per_source": counts,
        "available": {"original_mixable": len(o_ids), "synthetic": len(s_ids)},
        "original_not_mixed": unmixable,
        "original_decontaminated": n_excluded,
        "note": plan.note,
        "stratify": stratify,
        "upsample": upsample,
        "seed": seed,
        "inputs": {name: dataset_checksum(d.path) for name, d in (("original", orig), ("curated", cur)) if d is not None},
        "curation_config": cur.manifest.provenance.get("config") if cur is not None else None,
    }
    prov = {"stage": "mix", **{k: card[k] for k in ("ratio_requested", "seed", "stratify", "upsample", "inputs")}}
    with staged_output(ws.mix, "mix", "cocoa-data mix") as stage:  # swapped in when complete
        with ShardWriter(stage, "MixRecord", mode="create", provenance=prov, before_commit=store.sync) as w:
            for _, m in entries:
                w.write(m)
        atomic_write_text(stage / "README.md", dataset_card(card))
        atomic_write_json(stage / "mix_report.json", card)
    return card


def _stored(rec: PairRecord | SynthRecord, root: Path, store: ImageStore) -> ImageRef | None:
    """The record's mixed image as a reference into the workspace's image store (embedded bytes of older
    inputs are stored there; path refs are relative to the input dir)."""
    if isinstance(rec, SynthRecord):
        ref = rec.image
    else:
        ref = rec.qry_image if pair_kind(rec) == "image_to_text" else rec.pos_image
    return store.adopt(ref, root)


def dataset_card(card: dict[str, Any]) -> str:
    lines = [
        "---",
        "configs:",
        "- config_name: default",
        "  data_files: \"shard-*.arrow\"",
        "---",
        "",
        "# cocoa training mixture",
        "",
        "Written by `cocoa-data mix`. Rows are `MixRecord`s (Arrow IPC shards, readable with "
        "`datasets.load_dataset(\"arrow\", data_files=...)` run from this directory). Images are not copied here: "
        "rows refer to the workspace's image store (`../images/<xx>/<sha256>.<ext>`), so move or publish this "
        "directory together with `../images/`. Every row keeps its provenance "
        "(`origin`, `origin_id`, `meta.input`, `meta.record_id`, `meta.kind`).",
        "",
        "Stages: every row serves stage 1 (image + text) and stage 2 (block A = image + prompt, "
        "block B = text). Stage 3 reads `original/` pairs directly.",
        "",
        "## Ratio",
        "",
        f"- requested original:synthetic = {card['ratio_requested']}",
        f"- achieved = {card['ratio_achieved']} ({card['original_rows']} original, {card['synthetic_rows']} synthetic)",
        f"- {card['note']}",
        f"- stratified per source: {card['stratify']}; upsample: {card['upsample']}; seed: {card['seed']}",
        "",
        "## Rows per source",
        "",
        "| origin | source | rows |",
        "|---|---|---:|",
    ]
    for origin in ("original", "synthetic"):
        for src, n in sorted(card["per_source"][origin].items()):
            lines.append(f"| {origin} | {src or '(none)'} | {n} |")
    lines += ["", "## Not mixed", ""]
    if card["original_not_mixed"]:
        for k, n in sorted(card["original_not_mixed"].items()):
            lines.append(f"- {n} original pairs: {k} (no image + text pair to serve stages 1-2)")
    else:
        lines.append("- every original pair could be mixed")
    lines.append(f"- {card['original_decontaminated']} original pairs removed by decontamination "
                 "(listed in curated/rejected/)")
    lines += ["", "## Inputs", ""]
    for name, ck in card["inputs"].items():
        lines.append(f"- {name}: `{ck['path']}` ({ck['record_type']}, {ck['rows']} rows), manifest sha256 "
                     f"`{ck['manifest_sha256']}`, content sha256 `{ck['content_sha256']}`")
    lines += ["", "## Curation config", "", "```json", canonical_json(card["curation_config"]), "```", ""]
    return "\n".join(lines)

