"""Curation: every rule keeps and drops the rows it should; rejects are recorded; bad input is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cocoa.cli.data import cli
from cocoa.curation.config import CurationConfig
from cocoa.testing.curation import caption, noise_image, noise_png, pair, qa, unique_sentence
from cocoa.curation.pipeline import RULES, run_curation
from cocoa.curation.rejected import _quarantine_row, synth_payload
from cocoa.records import EvalRecord, ImageRef, QuarantineRecord, payload_json, to_row
from cocoa.shards import Workspace, open_dataset, write_records

EVAL_TEXT = "a small green rubber cylinder stands behind two large metal spheres"
CFG = {"image": {"max_pixels": 200_000}}


def _s(i: int, words: int = 14) -> str:
    return unique_sentence(i, words)


def _rule_corpus() -> tuple[list, list[str | None]]:
    """Rows with the outcome each must get: None (kept) or the rule that drops it."""
    rows: list = []
    want: list[str | None] = []
    seed = iter(range(1000, 2000))

    def add(rec, expect):  # type: ignore[no-untyped-def]
        rows.append(rec)
        want.append(expect)

    def img(size=(64, 64)):  # type: ignore[no-untyped-def]
        return noise_image(next(seed), size)

    n = iter(range(100, 10_000))

    def cap(text, expect, image=None, parent=None):  # type: ignore[no-untyped-def]
        i = next(n)
        add(caption(parent or f"p{i}", text, image or img()), expect)

    # image checks
    cap(_s(1), "image_unreadable", image=ImageRef(bytes=b"this is not an image"))
    cap(_s(2), "image_unreadable", image=ImageRef(path="images/missing.png"))  # file does not exist
    cap(_s(3), None)
    cap(_s(4), "image_too_small", image=img((20, 64)))
    cap(_s(5), None, image=img((28, 64)))
    cap(_s(6), "image_too_large", image=img((500, 500)))
    cap(_s(7), None, image=img((400, 400)))
    cap(_s(8), "image_aspect", image=img((28, 5600)))
    cap(_s(9), None, image=img((28, 5572)))
    # length (caption >= 5 words, question >= 3 words)
    cap("A red cube.", "length")
    cap("A red cube sits there.", None)
    add(qa("pq1", "Colour?", "Red.", img()), "length")
    add(qa("pq2", "What colour is it?", "Red.", img()), None)
    # refusal / hedge / meta talk
    cap("I'm sorry, I cannot see the image clearly enough to describe it.", "refusal")
    cap("A sorry-looking old robot stands near a rusty cannon on the lawn.", None)
    cap("It is hard to tell what the object is, maybe a large cube.", "hedge")
    cap("A hard metal cube rests on a table beside a tall lamp.", None)
    cap("Sure! Here is a detailed description: a blue cube on sand.", "meta_talk")
    cap("The image does not show any people, only a chair and a lamp.", "meta_talk")
    cap("The image shows a wooden chair next to a glowing desk lamp.", None)
    # repetition
    cap("a red cube and a blue ball then a red cube and a blue ball then a red cube and a blue ball again",
        "repetition_share")
    cap("a red cube sits on the left and a green cone sits on the left of the shiny purple ball today", None)
    cap("the tower is very very very very tall and grey under the cloudy sky", "repetition_run")
    cap("the tower is very very tall and grey under the cloudy evening sky", None)
    # QA sanity
    add(qa("pq3", "What is on the left of the red cube?", "What is on the left of the red cube", img()), "qa_copy")
    add(qa("pq4", "Is the sphere bigger than the small cube?", "The sphere is bigger.", img()), None)
    add(qa("pq5", "The cube colour here.", "Red.", img()), "qa_form")
    add(qa("pq6", "Describe the cube.", "It is red and shiny.", img()), None)
    # exact duplicates: within an image (any kind), across images (captions)
    shared = img()
    add(qa("pq7", "How many spheres are there?", "Two.", shared), None)
    add(qa("pq7", "How many spheres are there?", "Two.", shared).model_copy(update={"id": "dup-id-1"}),
        "exact_dup_image")
    add(qa("pq7", "How many cubes are there?", "Three.", shared), None)
    cap(_s(20), None)
    cap(_s(20), "exact_dup_global")  # same caption, another image
    add(qa("pq8", "What shape is the green object?", "A cylinder.", img()), None)
    add(qa("pq9", "What shape is the green object?", "A cylinder.", img()), None)  # QA repeats across images
    # near duplicates
    base = _s(30, 30).rstrip(".").split()
    cap(" ".join(base) + ".", None)
    edited = list(base)
    edited[15] = "zzzword"
    cap(" ".join(edited) + ".", "near_dup")
    cap(" ".join(base[:10] + _s(31, 20).split()), None)
    # perceptual image duplicates (same picture re-encoded for another parent)
    from PIL import Image
    import io

    pic = noise_png(4242)
    buf = io.BytesIO()
    Image.open(io.BytesIO(pic)).save(buf, format="JPEG", quality=95)
    cap(_s(40), None, image=ImageRef(bytes=pic))
    cap(_s(41), "image_near_dup", image=ImageRef(bytes=buf.getvalue()))
    cap(_s(42), None)
    # decontamination
    cap(_s(50), "decontam_image", image=ImageRef(bytes=noise_png(777)))
    cap(_s(51), None)
    cap("In the corner " + EVAL_TEXT + " under a bright light.", "decontam_text")
    cap("A green rubber cylinder is alone on a plain white floor today.", None)
    return rows, want


def _eval_root(root: Path) -> Path:
    d = root / "eval" / "toy_retrieval"
    (d / "images").mkdir(parents=True)
    (d / "images" / "e0.png").write_bytes(noise_png(777))
    recs = [
        EvalRecord(dataset="toy_retrieval", meta_task="retrieval", split="IND", qry_image=ImageRef(path="images/e0.png"),
                   tgt_texts=[EVAL_TEXT, "red cube"], tgt_images=[None, None]),
        EvalRecord(dataset="toy_retrieval", meta_task="retrieval", split="IND", qry_text="green rubber cylinder",
                   tgt_texts=["x"], tgt_images=[noise_image(888)]),
    ]
    write_records(d, "EvalRecord", recs)
    return root / "eval"


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    root = tmp_path_factory.mktemp("cur")
    rows, want = _rule_corpus()
    ws = Workspace(root / "shards")
    write_records(ws.synthetic, "SynthRecord", rows)
    originals = [
        pair("toy", qry_image=ImageRef(bytes=noise_png(777)), pos_text="a photo"),  # eval image -> rejected
        pair("toy", qry_text="find: " + EVAL_TEXT, pos_image=noise_image(5)),  # eval text -> rejected
        pair("toy", qry_image=noise_image(6), pos_text="a clean pair"),
    ]
    write_records(ws.original, "PairRecord", originals)
    ev = _eval_root(root)
    cfg = CurationConfig.build(CFG)
    res = run_curation(ws.root, cfg, eval_data=ev, show_progress=False)
    return ws, rows, want, res, originals


def _outcome(ws: Workspace) -> dict[str, str | None]:
    kept = {r.id: None for r in open_dataset(ws.curated)}
    for q in open_dataset(ws.rejected):
        kept[q.record_id] = q.reason
    return kept


@pytest.mark.parametrize("rule", [r for r in RULES if r != "invalid_record"])  # that one: test_hostile_curation.py
def test_rule_keeps_and_drops(curated, rule):
    ws, rows, want, _, _ = curated
    got = _outcome(ws)
    drops = [r for r, w in zip(rows, want) if w == rule]
    assert drops, f"no must-drop row for {rule}"
    for r in drops:
        assert got[r.id] == rule, (rule, r.caption or r.question, got[r.id])
    # the must-keep rows of the corpus (each placed beside a must-drop row) all survive every rule
    for r, w in zip(rows, want):
        if w is None:
            assert got[r.id] is None, (r.caption or (r.question, r.answer), got[r.id])


def test_every_row_accounted_and_report(curated):
    ws, rows, want, res, _ = curated
    rep = json.loads((ws.curated / "report.json").read_text())
    assert rep["rows_in"] == len(rows)
    assert rep["rows_out"] == sum(w is None for w in want)
    assert rep["rows_out"] + rep["rows_rejected"] == rep["rows_in"]
    for rule in RULES:
        assert rep["drops"][rule]["count"] == sum(w == rule for w in want)
        assert len(rep["drops"][rule]["examples"]) >= 1 or rule == "invalid_record"  # test_hostile_curation
    # the missing image is named in the reject detail
    missing = [q for q in open_dataset(ws.rejected) if "missing.png" in q.detail]
    assert missing and missing[0].reason == "image_unreadable"


def test_curated_text_is_normalised_and_rejects_carry_payload(curated):
    ws, rows, _, _, _ = curated
    by_id = {r.id: r for r in rows}
    for r in open_dataset(ws.curated):
        assert r.id in by_id
        t = r.caption if r.kind == "caption" else r.answer
        assert t == " ".join(t.split())
    for q in open_dataset(ws.rejected):
        assert q.stage == "curate" and q.reason in RULES
        if q.meta["input"] == "synthetic":
            assert q.payload == payload_json(by_id[q.record_id])
        # the columnar writer computes the same content id as the record model
        assert QuarantineRecord(**q.model_dump(exclude={"id"})).id == q.id


def test_original_rows_decontaminated(curated):
    ws, _, _, _, originals = curated
    rej = {q.record_id: q for q in open_dataset(ws.rejected) if q.meta.get("input") == "original"}
    assert set(rej) == {originals[0].id, originals[1].id}
    assert rej[originals[0].id].reason == "decontam_image"
    assert rej[originals[1].id].reason == "decontam_text"


def test_fast_quarantine_row_matches_record():
    rec = caption("p1", "A red cube sits on the floor.", noise_image(1))
    row = to_row(rec)
    fast = _quarantine_row("near_dup", "d", row, synth_payload(row), {"input": "synthetic"})
    ref = to_row(QuarantineRecord(stage="curate", reason="near_dup", detail="d", record_id=rec.id, key=rec.key,
                                  parent_id="p1", payload=payload_json(rec), meta={"input": "synthetic"}))
    assert fast == ref


def test_curate_is_deterministic_and_hf_loadable(tmp_path):
    rows, _ = _rule_corpus()
    outs = []
    ws = Workspace(tmp_path / "shards")
    write_records(ws.synthetic, "SynthRecord", rows)
    for _ in range(2):  # the second run overwrites the first
        run_curation(ws.root, CurationConfig.build(CFG), show_progress=False)
        outs.append([f.read_bytes() for f in open_dataset(ws.curated).files]
                    + [f.read_bytes() for f in open_dataset(ws.rejected).files])
    assert outs[0] == outs[1]
    import datasets

    ds = datasets.load_dataset("arrow", data_files=[str(f) for f in open_dataset(ws.curated).files], split="train")
    assert len(ds) == len(open_dataset(ws.curated))
    assert ds[0]["image"].size[0] > 0  # decoded to PIL by the Image feature


# -------------------------------------------------------------------------------------------------
# bad input
# -------------------------------------------------------------------------------------------------
def test_empty_input_dir(tmp_path):
    (tmp_path / "shards").mkdir()
    r = CliRunner().invoke(cli, ["curate", "--data", str(tmp_path / "shards"), "--no-progress"])
    assert r.exit_code == 1
    assert "synthetic" in r.output and "cocoa-data synth" in r.output


def test_schema_mismatched_shard(tmp_path):
    ws = Workspace(tmp_path / "shards")
    write_records(ws.synthetic, "PairRecord", [pair("s", qry_text="q", pos_text="p")])
    mf = ws.synthetic / "manifest.json"
    data = json.loads(mf.read_text())
    data["record_type"] = "SynthRecord"  # a PairRecord shard claiming to be synthetic output
    mf.write_text(json.dumps(data))
    r = CliRunner().invoke(cli, ["curate", "--data", str(ws.root), "--no-progress"])
    assert r.exit_code == 1
    assert "shard-00000.arrow" in r.output and "schema" in r.output


def test_config_unknown_key(tmp_path):
    cfg = tmp_path / "curate.yaml"
    cfg.write_text("near:\n  num_perm: 64\n  bandz: 8\n")
    r = CliRunner().invoke(cli, ["curate", "--data", str(tmp_path), "--config", str(cfg)])
    assert r.exit_code == 2
    assert "unknown key 'near.bandz'" in r.output


def test_config_yaml_and_flags(tmp_path):
    cfg = tmp_path / "curate.yaml"
    cfg.write_text("near:\n  num_perm: 64\n  bands: 16\ntext:\n  caption_min_words: 2\n")
    c = CurationConfig.from_yaml(cfg, {"near": {"threshold": 0.8}})
    assert (c.near.num_perm, c.near.bands, c.near.threshold, c.text.caption_min_words) == (64, 16, 0.8, 2)
    with pytest.raises(Exception, match="multiple of bands"):
        CurationConfig.build({"near": {"num_perm": 100, "bands": 16}})


def test_cli_curate_prints_table(tmp_path):
    ws = Workspace(tmp_path / "shards")
    recs = [caption(f"p{i}", _s(200 + i), noise_image(300 + i)) for i in range(4)]
    recs.append(caption("p9", "I'm sorry, I can't help with that request today.", noise_image(399)))
    write_records(ws.synthetic, "SynthRecord", recs)
    r = CliRunner().invoke(cli, ["curate", "--data", str(ws.root), "--no-progress", "--near-num-perm", "64"])
    assert r.exit_code == 0, r.output
    assert "refusal" in r.output and "5 rows in, 4 out" in r.output
    assert json.loads((ws.curated / "report.json").read_text())["config"]["near"]["num_perm"] == 64


def test_near_dup_clusters_keep_one():
    import polars as pl

    from cocoa.curation.dedup import near_duplicates
    from cocoa.curation.text import word_hashes

    base = _s(500, 30)
    w = base.split()
    texts = [base, " ".join(w[:5] + ["qq"] + w[6:]), " ".join(w[:20] + ["rr"] + w[21:]), _s(501, 30), base]
    f, o = word_hashes(pl.Series(texts))
    res = near_duplicates(f, o, num_perm=256, bands=32, threshold=0.7)  # P(candidate | J=0.8) = 0.998
    assert list(res.rep) == [0, 0, 0, 3, 0]


def test_repetition_features():
    import polars as pl

    from cocoa.curation.text import longest_repeat, repeated_share, word_hashes

    f, o = word_hashes(pl.Series(["a b a b a b c", "x y z", "", "go go go go go"]))
    assert list(longest_repeat(f, o)) == [3, 1, 0, 5]
    share, n = repeated_share(f, o, 2)
    assert n.tolist() == [6, 2, 0, 4]
    assert share[0] == pytest.approx(1 - 3 / 6) and share[1] == 0 and share[3] == pytest.approx(0.75)


def test_phash_pairs_pigeonhole():
    from cocoa.curation.images import phash_pairs

    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**63, size=200, dtype=np.int64).astype(np.uint64)
    b = a.copy()
    b[:50] ^= np.uint64(0b101)  # distance 2
    b[50:100] ^= np.uint64(0b111)  # distance 3
    got = {(int(i), int(j)) for i, j in phash_pairs(a, b, 2)}
    assert {(i, i) for i in range(50)} <= got and {(i, i) for i in range(100, 200)} <= got
    assert not any(i == j for i, j in got if 50 <= i < 100)


def test_decontaminate_against_scenes_benchmark(scenes_root, tmp_path):
    """The real scenes benchmark: eval/ holds several EvalRecord datasets with images stored by path."""
    from cocoa.curation.decontam import find_eval_datasets

    evals = find_eval_datasets(scenes_root / "eval")
    assert len(evals) >= 2
    ev = next(iter(open_dataset(evals[0])))
    ev_ref = ev.qry_image if ev.qry_image is not None else next(r for r in ev.tgt_images if r is not None)
    leaked = ImageRef(bytes=ev_ref.read_bytes(evals[0]))  # an eval image, copied into training data
    ws = Workspace(tmp_path / "shards")
    originals = list(open_dataset(scenes_root / "original"))
    write_records(ws.original, "PairRecord", originals)
    syn = [caption("leak", _s(900), leaked)]
    syn += [caption(f"p{i}", _s(901 + i), r.qry_image or r.pos_image) for i, r in enumerate(originals[:20])]
    write_records(ws.synthetic, "SynthRecord", syn)
    res = run_curation(ws.root, eval_data=scenes_root / "eval", show_progress=False)
    got = _outcome(ws)
    assert got[syn[0].id] == "decontam_image"
    rep = res.report["decontamination"]
    assert rep["eval_index"]["images"] > 0 and not rep["eval_index"]["unreadable_images"]
    # instructions shared with the eval sets are boilerplate, not leakage: only a few training pairs of
    # this closed-vocabulary benchmark match (identical label questions, single-object crops)
    assert rep["eval_index"]["template_ngrams_ignored"] > 0
    assert rep["original"]["rejected"] <= len(originals) * 0.10, rep["original"]
