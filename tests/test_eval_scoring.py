"""P@1 against a brute-force reference, MMEB averaging, the embedding cache store, reports."""

import json
import math

import numpy as np
import pytest

from cocoa.eval.cache import EmbeddingCache, input_key, model_fingerprint
from cocoa.eval.report import markdown, plot, rich_table, rows, write_reports
from cocoa.eval.scoring import META_TASKS, DatasetScore, EvalResult, aggregate, hits_at_1


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _brute_force(q, c, cand_lists):
    """The rule written out plainly: cosine similarities from scratch, positive must beat every distractor."""
    hits = []
    for n, cands in enumerate(cand_lists):
        def cos(i):
            a, b = q[n].astype(np.float64), c[i].astype(np.float64)
            return float(a @ b) / math.sqrt(float(a @ a) * float(b @ b))

        pos = cos(cands[0])
        others = [cos(j) for j in cands[1:] if j != cands[0]]
        hits.append(all(pos > o for o in others))
    return np.array(hits)


def test_p_at_1_matches_brute_force_on_random_embeddings():
    rng = np.random.default_rng(0)
    d, m = 16, 60
    c = _unit(rng.normal(size=(m, d))).astype(np.float32)
    # exact ties: candidate rows 50..59 duplicate rows 0..9 (same vector, different index)
    c[50:] = c[:10]
    n = 300
    q = _unit(rng.normal(size=(n, d))).astype(np.float32)
    # a third of the queries sit right next to their positive so that hits are common
    cand_lists = []
    for i in range(n):
        k = int(rng.integers(1, 12))
        cands = [int(x) for x in rng.choice(m, size=k, replace=False)]
        if i % 3 == 0:
            q[i] = _unit(c[cands[0]] + 0.05 * rng.normal(size=d))
        if i % 7 == 0 and cands[0] < 10:
            cands.append(cands[0] + 50)  # a distractor that ties the positive exactly -> a miss
        if i % 11 == 0:
            cands.append(cands[0])  # the positive itself repeated: not a distractor
        cand_lists.append(cands)
    ref = _brute_force(q, c, cand_lists)
    hits, trivial = hits_at_1(q, c, cand_lists)
    assert hits.dtype == bool and hits.shape == (n,)
    np.testing.assert_array_equal(hits, ref)
    assert 0.2 < hits.mean() < 0.8  # both outcomes well represented
    # chunking does not change anything
    hits7, _ = hits_at_1(q, c, cand_lists, chunk=7)
    np.testing.assert_array_equal(hits7, ref)
    # single-candidate records (no distractor) are trivial hits
    assert trivial[[i for i, cl in enumerate(cand_lists) if len(set(cl)) == 1]].all()
    assert hits[trivial].all()


def test_ties_count_against_the_positive():
    c = _unit(np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32))
    q = _unit(np.array([[1.0, 0.2], [1.0, 0.2], [1.0, 0.2]], dtype=np.float32))
    hits, trivial = hits_at_1(q, c, [[0, 1, 2], [0, 2], [1, 0]])
    assert hits.tolist() == [False, True, False]  # exact tie 0 vs 1 -> miss, in both orders
    assert not trivial.any()
    # a collapsed model (all embeddings equal) scores 0, not 1
    same = np.ones((4, 3), dtype=np.float32) / np.sqrt(3)
    h, _ = hits_at_1(same[:2], same, [[0, 1, 2], [1, 2, 3]])
    assert not h.any()


def test_bad_candidate_lists_are_refused():
    q = np.eye(2, dtype=np.float32)
    with pytest.raises(ValueError, match="no candidate"):
        hits_at_1(q, q, [[0], []])
    with pytest.raises(ValueError, match="out of range"):
        hits_at_1(q, q, [[0], [5]])
    with pytest.raises(ValueError, match="shapes"):
        hits_at_1(q, np.eye(3, dtype=np.float32), [[0], [1]])


def _score(task, split, p, n=10):
    return DatasetScore(meta_task=task, split=split, p_at_1=p, hits=int(round(p * n)), n=n)


def test_aggregate_is_a_mean_over_datasets():
    ds = {
        "A": _score("classification", "IND", 0.5, n=1000),
        "B": _score("classification", "OOD", 1.0, n=10),
        "C": _score("vqa", "IND", 0.2, n=100),
    }
    meta, splits, overall = aggregate(ds)
    assert meta["classification"] == pytest.approx(0.75)  # not query-weighted (would be ~0.505)
    assert meta["vqa"] == pytest.approx(0.2)
    assert meta["retrieval"] is None and meta["grounding"] is None
    assert splits["IND"] == pytest.approx(0.35) and splits["OOD"] == pytest.approx(1.0)
    assert overall == pytest.approx((0.5 + 1.0 + 0.2) / 3)
    assert aggregate({}) == ({m: None for m in META_TASKS}, {"IND": None, "OOD": None}, None)


def _result(values, label="m"):
    ds = {k: _score(t, s, p) for k, (t, s, p) in values.items()}
    meta, splits, overall = aggregate(ds)
    return EvalResult(model=f"/x/{label}", model_hash="h" + label, benchmark="scenes", label=label, datasets=ds,
                      meta_tasks=meta, splits=splits, overall=overall)


def test_reports_show_the_full_shape_with_dashes(tmp_path):
    res = _result({"color": ("classification", "IND", 0.8), "count": ("vqa", "OOD", 0.4)})
    before = _result({"color": ("classification", "IND", 0.5)}, label="base")
    md = markdown(res, before)
    for row in ("color", "count", "**Classification**", "**VQA**", "**Retrieval**", "**Grounding**", "**IND**",
                "**OOD**", "**Overall**"):
        assert row in md
    line = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith("| ")}
    assert "| - |" in line["**Retrieval**"] and "| - |" in line["**Grounding**"]
    assert "50.0" in line["color"] and "80.0" in line["color"] and "+30.0" in line["color"]
    assert line["count"].count("| - |") == 2  # no before value -> no delta
    from rich.console import Console

    con = Console(width=150, record=True)
    con.print(rich_table(res, before))
    text = con.export_text()
    assert "Grounding" in text and "Overall" in text and "+30.0" in text
    assert [r["name"] for r in rows(res) if r["kind"] == "summary"] == [
        "Classification", "VQA", "Retrieval", "Grounding", "IND", "OOD", "Overall"]
    paths = write_reports(res, tmp_path / "out", before)
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    back = EvalResult.load(tmp_path / "out")
    assert back == res and back.summary()["count"] == pytest.approx(0.4)
    plot(_result({}), tmp_path / "empty.png")  # nothing evaluated still plots (all '-')


def test_result_load_errors(tmp_path):
    from cocoa.records import RecordError

    (tmp_path / "bad.json").write_text("{nope")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something"}))
    for name, msg in [("missing.json", "no such results file"), ("bad.json", "not valid JSON"),
                      ("other.json", "not a cocoa-eval results file")]:
        with pytest.raises(RecordError, match=msg):
            EvalResult.load(tmp_path / name)


def test_cache_store_roundtrip_and_damaged_chunk(tmp_path):
    rng = np.random.default_rng(1)
    keys = [input_key(f"t{i}", None) for i in range(10)]
    emb = rng.normal(size=(10, 8)).astype(np.float32)
    c1 = EmbeddingCache(tmp_path, "abc")
    c1.put(keys[:6], emb[:6])
    c1.put(keys[6:], emb[6:])
    assert not list((tmp_path / "abc").glob(".*tmp*"))  # atomic: no temporary file left
    c2 = EmbeddingCache(tmp_path, "abc")
    assert len(c2) == 10 and c2.missing(keys + ["zz"]) == ["zz"]
    np.testing.assert_array_equal(c2.get(keys[::-1]), emb[::-1])
    assert len(EmbeddingCache(tmp_path, "other")) == 0
    # a damaged chunk is ignored with a warning: its inputs are just encoded again
    chunks = sorted((tmp_path / "abc").glob("chunk-*.npy"))
    assert len(chunks) == 2 and all(c.with_suffix(".keys").is_file() for c in chunks)
    chunks[0].write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable"):
        c3 = EmbeddingCache(tmp_path, "abc")
    assert 0 < len(c3.missing(keys)) < 10
    # a chunk whose .keys file never got written (killed between the two renames) does not exist
    chunks[1].with_suffix(".keys").unlink()
    with pytest.warns(UserWarning, match="unreadable"):  # chunk 0 is still garbage
        assert len(EmbeddingCache(tmp_path, "abc")) == 0
    # no root: memory only
    c4 = EmbeddingCache(None, "abc")
    c4.put(keys[:2], emb[:2])
    assert len(c4) == 2 and not c4.enabled


def test_model_fingerprint_follows_weights_and_spec(tmp_path):
    from cocoa.records import RecordError

    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text("{}")
    with pytest.raises(RecordError, match="no weights file"):
        model_fingerprint(m, {"pooling": "eos"})
    (m / "model.safetensors").write_bytes(b"w1")
    h1, covered = model_fingerprint(m, {"pooling": "eos"}, tmp_path / "cache")
    assert "model.safetensors" in covered["files"]
    assert model_fingerprint(m, {"pooling": "eos"}, tmp_path / "cache")[0] == h1  # memoised, same
    assert model_fingerprint(m, {"pooling": "mean"})[0] != h1
    (m / "README.md").write_text("notes")  # not an input of the embedding
    (m / "eval-scenes").mkdir()
    assert model_fingerprint(m, {"pooling": "eos"})[0] == h1
    (m / "model.safetensors").write_bytes(b"w2")
    assert model_fingerprint(m, {"pooling": "eos"}, tmp_path / "cache")[0] != h1


def test_summarize_runs_mean_std_over_seeds():
    from cocoa.eval.scoring import summarize_runs

    runs = [_result({"color": ("classification", "IND", p), "count": ("vqa", "OOD", q)})
            for p, q in [(0.5, 0.1), (0.7, 0.3), (0.6, 0.2)]]
    s = summarize_runs(runs)
    assert s["color"]["mean"] == pytest.approx(0.6) and s["color"]["std"] == pytest.approx(0.1)
    assert s["overall"]["mean"] == pytest.approx(0.4) and s["overall"]["n"] == 3
    assert s["grounding"] == {"mean": None, "std": None, "n": 0}
    assert summarize_runs(runs[:1])["OOD"]["std"] == 0.0


def test_score_does_not_depend_on_candidate_columns():
    """Identical embeddings at different rows of the candidate matrix tie exactly (BLAS computes different
    output columns with different kernels, 1-2 ulp apart); a collapsed model scores 0 whatever the layout."""
    rng = np.random.default_rng(1)
    n, m, d = 300, 400, 64
    same = np.tile(_unit(rng.normal(size=(1, d))).astype(np.float32), (m, 1))
    q = _unit(rng.normal(size=(n, d))).astype(np.float32)
    cand_lists = [[int(x) for x in rng.choice(m, size=20, replace=False)] for _ in range(n)]
    hits, trivial = hits_at_1(q, same, cand_lists)
    assert hits.sum() == 0 and not trivial.any()
    # a permutation of the candidate matrix's rows (same content per candidate) changes nothing
    c = _unit(rng.normal(size=(m, d))).astype(np.float32)
    c[200:] = c[:200]
    ref, _ = hits_at_1(q, c, cand_lists)
    perm = rng.permutation(m)
    where = np.argsort(perm)  # new row of old candidate i
    permuted = [[int(where[i]) for i in cl] for cl in cand_lists]
    got, _ = hits_at_1(q, c[perm], permuted)
    np.testing.assert_array_equal(got, ref)
