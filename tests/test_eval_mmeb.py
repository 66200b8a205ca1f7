"""cocoa-eval on an MMEB-eval fixture in the published layout (parquet per dataset + images.zip)."""

import json

import pytest
from click.testing import CliRunner

MMEB_DS = ["ImageNet-1K", "MSCOCO_t2i", "RefCOCO"]  # classification/IND, retrieval/IND, grounding/OOD; no VQA


@pytest.fixture(scope="module")
def mmeb_dir(tmp_path_factory):
    from cocoa.testing.mmeb import write_mmeb_eval_fixture

    root = tmp_path_factory.mktemp("mmeb") / "MMEB-eval"
    return write_mmeb_eval_fixture(root, datasets=MMEB_DS, n_per_dataset=3, n_candidates=5)


def _invoke(*args):
    from cocoa.cli.eval import cli

    return CliRunner().invoke(cli, [str(a) for a in args], terminal_width=200)


def test_mmeb_fixture_through_the_whole_evaluator(tiny_model_dir, mmeb_dir, tmp_path):
    assert (mmeb_dir / "images.zip").is_file() and (mmeb_dir / "RefCOCO" / "test-00000-of-00001.parquet").is_file()
    common = ["--model", tiny_model_dir, "--benchmark", "mmeb", "--mmeb-dir", mmeb_dir, "--cache-dir", tmp_path / "cache"]
    r = _invoke(*common, "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()

    def row(name):
        return next(ln for ln in lines if ln.strip("│┃ ").startswith(name + " "))

    # the full table shape: every dataset, all four meta-tasks, IND, OOD, overall; empty rows show "-"
    for name in MMEB_DS + ["Classification", "VQA", "Retrieval", "Grounding", "IND", "OOD", "Overall"]:
        assert row(name)
    assert row("VQA").rstrip(" │").endswith("-") and "0 ds" in row("VQA")
    assert "OOD" in row("RefCOCO") and "Grounding" in row("RefCOCO") and "IND" in row("ImageNet-1K")
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["benchmark"] == "mmeb" and set(res["datasets"]) == set(MMEB_DS)
    assert res["meta_tasks"]["vqa"] is None and res["splits"]["OOD"] == res["datasets"]["RefCOCO"]["p_at_1"]
    assert res["overall"] == pytest.approx(sum(d["p_at_1"] for d in res["datasets"].values()) / 3)
    assert all(d["n"] == 3 and d["n_candidates"] == 5 for d in res["datasets"].values())
    assert res["encode"]["encoded"] == res["encode"]["unique_inputs"] > 0
    # MSCOCO_t2i candidates are images shared across queries (a retrieval pool): encoded once
    assert res["encode"]["unique_inputs"] < sum(d["n"] * (1 + d["n_candidates"]) for d in res["datasets"].values())

    # rerun (images re-read from the zip and hashed): nothing to encode; --datasets selects
    r = _invoke(*common, "--out", tmp_path / "out2", "--datasets", "RefCOCO,ImageNet-1K", "--no-plot")
    assert r.exit_code == 0, r.output
    res2 = json.loads((tmp_path / "out2" / "results.json").read_text())
    assert res2["encode"]["encoded"] == 0 and set(res2["datasets"]) == {"RefCOCO", "ImageNet-1K"}
    assert res2["datasets"]["RefCOCO"] == res["datasets"]["RefCOCO"]


def test_mmeb_inputs_line_up_with_their_embeddings(tiny_model_dir, mmeb_dir, tmp_path):
    """With the query itself inserted as the positive every query must score; inserted last as a
    distractor that ties the positive... it must never score. Checks keys, zip reads and ordering."""
    from cocoa.eval import evaluate
    from cocoa.eval.data import load_mmeb
    from cocoa.records import EvalRecord

    sets = load_mmeb(mmeb_dir, ["MSCOCO_t2i", "RefCOCO"])
    for s in sets:
        s.records = [EvalRecord(dataset=r.dataset, meta_task=r.meta_task, split=r.split, qry_text=r.qry_text,
                                qry_image=r.qry_image, tgt_texts=[r.qry_text] + r.tgt_texts,
                                tgt_images=[r.qry_image] + r.tgt_images) for r in s.records]
    res = evaluate(tiny_model_dir, "mmeb", sets=sets, cache_dir=tmp_path / "cache", write=False, quiet=True)
    assert all(d.p_at_1 == 1.0 for d in res.datasets.values())
    sets = load_mmeb(mmeb_dir, ["MSCOCO_t2i", "RefCOCO"])
    for s in sets:
        s.records = [EvalRecord(dataset=r.dataset, meta_task=r.meta_task, split=r.split, qry_text=r.qry_text,
                                qry_image=r.qry_image, tgt_texts=r.tgt_texts + [r.qry_text],
                                tgt_images=r.tgt_images + [r.qry_image]) for r in s.records]
    res = evaluate(tiny_model_dir, "mmeb", sets=sets, cache_dir=tmp_path / "cache", write=False, quiet=True)
    assert all(d.p_at_1 == 0.0 for d in res.datasets.values()) and res.encode["encoded"] == 0


def test_mmeb_bad_input(tiny_model_dir, tmp_path):
    from cocoa.testing.mmeb import write_mmeb_eval_fixture

    bad_row = {"qry_text": "<|image_1|> Represent the given image for classification",
               "qry_img_path": "ImageNet-1K/ImageNet-1K_0.jpg", "tgt_text": ["", "red cube", "blue ball"],
               "tgt_img_path": ["", "", ""]}
    root = write_mmeb_eval_fixture(tmp_path / "MMEB-eval", datasets=["ImageNet-1K", "RefCOCO"], n_per_dataset=2,
                                   n_candidates=3, extra_rows={"ImageNet-1K": [bad_row]})
    common = ["--model", tiny_model_dir, "--benchmark", "mmeb", "--mmeb-dir", root, "--cache-dir", tmp_path / "cache",
              "--out", tmp_path / "out", "--no-plot"]
    # unknown dataset name: refused before any work, the known ones listed
    r = _invoke(*common, "--datasets", "ImageNet-1K,ImageNet-2K")
    assert r.exit_code == 1 and "'ImageNet-2K'" in r.output and "ImageNet-1K, RefCOCO" in r.output
    # a candidate list with an empty positive: the run stops, naming the dataset file and row
    r = _invoke(*common)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "ImageNet-1K/test-00000-of-00001.parquet row 2" in r.output and "positive" in r.output
    # ... or, asked for, the row is skipped and counted (never silently)
    with pytest.warns(UserWarning, match="1 of 3 rows skipped"):
        r = _invoke(*common, "--on-bad-row", "skip")
    assert r.exit_code == 0, r.output
    assert "2 (+1 skipped)" in r.output
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["datasets"]["ImageNet-1K"]["n_skipped"] == 1 and res["datasets"]["ImageNet-1K"]["n"] == 2
    assert "(+1 skipped)" in (tmp_path / "out" / "results.md").read_text()
    # not a directory
    r = _invoke(*common[:5], tmp_path / "nope", *common[6:])
    assert r.exit_code == 1 and "not a directory" in r.output
