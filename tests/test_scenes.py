"""Procedural scenes benchmark: determinism, scene-graph consistency, layout, OOD hold-out, CLI."""

import json
import random

import pytest
from click.testing import CliRunner

from cocoa.sources import scenes as S
from cocoa.records import EvalRecord, PairRecord, RecordError
from cocoa.shards import open_dataset


def _first_pairs(n, seed=0, **kw):
    return list(S.iter_train_pairs(n, seed, **kw))


def test_same_seed_same_bytes_and_records():
    a, b = _first_pairs(15, seed=3), _first_pairs(15, seed=3)
    assert [r.id for r in a] == [r.id for r in b]
    assert [r.qry_image.bytes if r.qry_image else r.pos_image.bytes for r in a] == \
        [r.qry_image.bytes if r.qry_image else r.pos_image.bytes for r in b]
    assert [r.meta for r in a] == [r.meta for r in b]
    ev1 = list(S.iter_eval_sets(2, 6, seed=3, datasets=["SceneT2I-OOD", "SceneVQA"]))
    ev2 = list(S.iter_eval_sets(2, 6, seed=3, datasets=["SceneT2I-OOD", "SceneVQA"]))
    assert [r.id for r in ev1] == [r.id for r in ev2]
    assert [x.bytes for x in ev1[0].tgt_images] == [x.bytes for x in ev2[0].tgt_images]
    c = _first_pairs(15, seed=4)
    assert {r.id for r in a}.isdisjoint({r.id for r in c})
    # record i depends only on (seed, i): a resumed stream gives the same tail
    tail = list(S.iter_train_pairs(5, 3, start=10))
    assert [r.id for r in tail] == [r.id for r in a[10:]]
    # rendering is a pure function of the scene graph
    scene = S.scene_of(a[0])
    img = S.render_scene(scene, 112)
    assert S.png_bytes(img) == S.png_bytes(S.render_scene(S.Scene.from_dict(scene.to_dict()), 112))
    assert img.size == (112, 112) and img.mode == "RGB"


def test_scene_graph_consistency():
    recs = _first_pairs(200, seed=1)
    tasks = {r.meta["task"] for r in recs}
    assert tasks == set(S.TASKS)
    checked = 0
    for r in recs:
        scene = S.scene_of(r)
        assert 1 <= len(scene.objects) <= S.MAX_OBJECTS
        assert r.source == S.TRAIN_SOURCE[r.meta["task"]]
        if r.meta["task"] == "vqa":
            qt, ans = r.meta["qtype"], r.pos_text
            q = r.qry_text.split("question: ", 1)[1]
            if qt == "count_all":
                assert ans == str(len(scene.objects))
            elif qt == "count_color":
                color = q.split("How many ")[1].split(" objects")[0]
                assert ans == str(scene.count(color=color))
            elif qt == "count_shape":
                shape = q.split("How many ")[1].split("s are")[0]
                assert ans == str(scene.count(shape=shape))
            elif qt in ("color_of", "shape_of", "material_of", "size_of", "text_on"):
                o = scene.objects[r.meta["target"]]
                attr = {"color_of": "color", "shape_of": "shape", "material_of": "material", "size_of": "size",
                        "text_on": "text"}[qt]
                assert ans == getattr(o, attr)
            elif qt == "relation":
                body = q[len("Is the "):-1]
                rel = next(r_ for r_ in ("left of", "right of", "above", "below") if f" {r_} the " in body)
                a, b = body.split(f" {rel} the ")
                ia = [i for i in range(len(scene.objects)) if scene.refer(i) == a]
                ib = [i for i in range(len(scene.objects)) if scene.refer(i) == b]
                assert len(ia) == 1 and len(ib) == 1
                assert ans == ("yes" if scene.relation(ia[0], ib[0])[rel] else "no")
            elif qt == "exist":
                color, shape = q[len("Is there a "):-1].split(" ")
                assert ans == ("yes" if scene.count(color=color, shape=shape) else "no")
            checked += 1
        elif r.meta["task"] == "classification":
            main = scene.objects[0]
            assert r.pos_text == main.label and main.size == "large"
            assert all(o.size == "small" for o in scene.objects[1:])
        elif r.meta["task"] == "retrieval_i2t":
            # the coarse caption names exactly the scene's colour-shape labels (no counts/sizes/materials)
            named = {lab for lab in S.ALL_LABELS if f" {lab}" in r.pos_text}
            assert named == scene.caption_key()
            assert not any(w in r.pos_text for w in ("small", "large", "metallic", "striped", "left"))
        elif r.meta["task"] == "grounding":
            ref = r.qry_text.rsplit(": ", 1)[1]
            assert scene.refer(r.meta["target"]) == ref
            assert r.pos_image.load().size == (56, 56)
    assert checked > 20
    # relations are derived from positions
    sc = S.Scene(objects=(S.SceneObject("cube", "red", "small", "matte", 0.2, 0.5),
                          S.SceneObject("sphere", "blue", "large", "metallic", 0.8, 0.2)))
    rel = {(d["subject"], d["relation"], d["object"]) for d in sc.to_dict()["relations"]}
    assert {(0, "left of", 1), (1, "right of", 0), (1, "above", 0), (0, "below", 1)} <= rel
    assert not any(r[1] == "overlapping" for r in rel)
    assert sc.coarse_caption() == "a photo with a red cube and a blue sphere"


def test_texts_are_coarse_but_scene_is_rich():
    recs = _first_pairs(60, seed=2)
    texts = " ".join(r.pos_text + " " + r.qry_text for r in recs if r.meta["task"] != "vqa")
    for fine in ("metallic", "striped", "printed", "left of", "overlapping"):
        assert fine not in texts
    objs = [o for r in recs for o in r.meta["scene"]["objects"]]
    assert {o["material"] for o in objs} == set(S.MATERIALS)
    assert any(o["text"] for o in objs) and {o["size"] for o in objs} == set(S.SIZES)
    assert max(r.meta["scene"]["count"] for r in recs) >= 5


def test_benchmark_layout_hf_and_ood(scenes_root):
    summary = json.loads((scenes_root / "benchmark.json").read_text())
    assert set(summary["eval"]) == set(S.DATASETS)
    train = open_dataset(scenes_root / "original")
    assert train.record_type == "PairRecord" and len(train) == 240
    recs = list(train)
    assert all(isinstance(r, PairRecord) and r.meta["task"] in S.TASKS for r in recs)
    # OOD colour x shape combinations never occur in training scenes
    train_combos = {(o["color"], o["shape"]) for r in recs for o in r.meta["scene"]["objects"]}
    assert train_combos and not (train_combos & S.HELD_OUT_COMBOS)
    hf = train.to_hf()
    assert len(hf) == 240
    row = hf[0]
    assert (row["qry_image"] or row["pos_image"]).size == (112, 112)

    for name, info in S.DATASETS.items():
        d = scenes_root / "eval" / name
        ds = open_dataset(d)
        assert ds.record_type == "EvalRecord" and len(ds) == 12
        ood_hits = 0
        phrasings = {p for p in S.PROMPTS[info["task"]]["IND"]}
        for rec in ds:
            assert isinstance(rec, EvalRecord)
            assert (rec.dataset, rec.meta_task, rec.split) == (name, info["meta_task"], info["split"])
            n = len(rec.tgt_texts)
            assert n == (len(S.ALL_LABELS) if info["task"] == "classification" else 16)
            assert len(set(rec.tgt_texts)) == n or info["task"] in ("retrieval_t2i", "grounding")
            imgs = [x for x in rec.tgt_images if x is not None]
            if info["task"] in ("retrieval_t2i", "grounding"):
                assert len(imgs) == n and len({x.path for x in imgs}) == n  # distinct candidate images
                assert all(x.bytes is None and x.path.startswith("images/") for x in imgs)
                assert imgs[0].load(root=d).size == ((112, 112) if info["task"] == "retrieval_t2i" else (56, 56))
            if rec.qry_image is not None:
                assert rec.qry_image.load(root=d).size == (112, 112)
            combos = {(o["color"], o["shape"]) for o in rec.meta["scene"]["objects"]}
            ood_hits += bool(combos & S.HELD_OUT_COMBOS)
            ind_prompt = any(rec.qry_text.startswith(p.split("{")[0]) for p in phrasings)
            assert ind_prompt == (info["split"] == "IND"), rec.qry_text
        assert ood_hits == (12 if info["split"] == "OOD" else 0)
        # HF datasets opens every eval set; images decode from any working directory
        hf = S.load_eval_hf(d)
        row = hf[0]
        assert row["dataset"] == name and len(row["tgt_images"]) == len(row["tgt_texts"])
        if info["task"] in ("retrieval_t2i", "grounding"):
            assert row["tgt_images"][0].size[0] in (56, 112)


def test_eval_hard_negatives_and_answers(scenes_root):
    vqa = list(open_dataset(scenes_root / "eval" / "SceneVQA"))
    for rec in vqa:
        same_type = S.ANSWERS_BY_TYPE[rec.meta["answer_type"]]
        k = min(len(same_type) - 1, 15)
        assert set(rec.tgt_texts[1:1 + k]) <= set(same_type)  # answers of the same type come first
        assert rec.tgt_texts[0] in same_type
    t2i = list(open_dataset(scenes_root / "eval" / "SceneT2I"))
    assert all(r.meta["n_hard"] >= 4 for r in t2i)
    i2t = list(open_dataset(scenes_root / "eval" / "SceneI2T"))
    for rec in i2t:
        keys = [frozenset(lab for lab in S.ALL_LABELS if f" {lab}" in t) for t in rec.tgt_texts]
        assert keys[0] == S.scene_of(rec).caption_key()
        assert keys[0] not in keys[1:]  # no distractor caption describes the query image


def test_iter_eval_sets_embedded_and_errors(tmp_path):
    recs = list(S.iter_eval_sets(2, 5, seed=0, datasets=["SceneGround-OOD", "SceneT2I"]))
    assert [r.dataset for r in recs] == ["SceneGround-OOD"] * 2 + ["SceneT2I"] * 2
    assert all(x.bytes is not None for r in recs for x in r.tgt_images)
    with pytest.raises(RecordError, match="unknown scenes dataset.*known: SceneCls"):
        list(S.iter_eval_sets(1, 5, datasets=["ImageNet-1K"]))
    with pytest.raises(RecordError, match="unknown scenes dataset"):
        S.build_benchmark(tmp_path / "b", 1, 1, 1, datasets=["SceneCls", "Nope"])
    assert not (tmp_path / "b").exists()
    with pytest.raises(RecordError, match="at least 28"):
        S.build_benchmark("/nonexistent/never", 1, 1, 1, image_size=20)
    with pytest.raises(RecordError, match="not a scene graph"):
        S.Scene.from_dict({"objects": [{"shape": "cube"}]})
    # sampling respects held-out combos and the object-count range
    rng = random.Random(0)
    for _ in range(200):
        sc = S.sample_scene(rng)
        assert not (sc.combos() & S.HELD_OUT_COMBOS) and 1 <= len(sc.objects) <= 6


def test_cli_builds_refuses_existing_and_contact_sheet(tmp_path):
    from PIL import Image

    from cocoa.cli.data import cli

    out = tmp_path / "sc"
    sheet = tmp_path / "sheet.png"
    args = ["scenes", "--out", str(out), "--train", "12", "--eval-per-task", "2", "--distractors", "4",
            "--datasets", "SceneCls,SceneT2I-OOD", "--image-size", "84", "--contact-sheet", str(sheet)]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "SceneT2I-OOD" in r.output and "held-out" in r.output
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["SceneCls", "SceneT2I-OOD"]
    rec = next(iter(open_dataset(out / "eval" / "SceneT2I-OOD")))
    assert len(rec.tgt_images) == 5 and rec.tgt_images[0].load(root=out / "eval" / "SceneT2I-OOD").size == (84, 84)
    # the contact sheet shows the rendered training images (tile 0 is record 0's image, upscaled x2)
    im = Image.open(sheet).convert("RGB")
    first = next(S.iter_train_pairs(1, 0, image_size=84))
    tile = (first.qry_image or first.pos_image).load()
    assert im.crop((4, 4, 4 + 168, 4 + 168)).resize((84, 84), Image.Resampling.NEAREST).tobytes() == tile.tobytes()
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1 and "already exists" in r.output
    r = CliRunner().invoke(cli, args[:-2] + ["--overwrite"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["scenes", "--out", str(out), "--datasets", "Nope"])
    assert r.exit_code == 2 and "known: SceneCls" in r.output
