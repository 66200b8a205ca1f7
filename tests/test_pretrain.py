"""Generative pre-training of the tiny model: it learns, saves the user's way, and is cached."""

import json
import random

import pytest
import torch
from click.testing import CliRunner

from cocoa.records import PairRecord, RecordError
from cocoa.shards import write_records
from cocoa.tiny import pretrain as P
from cocoa.model.spec import EmbeddingSpec


@pytest.fixture(scope="module")
def pairs_root(tmp_path_factory):
    """A small scenes-like benchmark root: root/original holds PairRecord shards."""
    from cocoa.sources import scenes

    root = tmp_path_factory.mktemp("pairs")
    recs = list(scenes.iter_train_pairs(24, seed=3))
    write_records(root / "original", "PairRecord", recs)
    return root


@pytest.fixture(scope="module")
def pretrained(pairs_root, tiny_model_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("COCOA_CACHE", str(cache))
    kw = dict(base=str(tiny_model_dir), batch_size=8, lr=2e-3, curriculum=0.25, align_steps=6, align_batch_size=8,
              progress=False)
    d = P.pretrained_tiny_dir(pairs_root, steps=40, seed=0, **kw)
    yield d, kw, cache
    mp.undo()


def test_short_run_lowers_the_loss_and_reloads(pretrained):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    d, _, _ = pretrained
    rows = P.read_metrics(d)
    assert [r["step"] for r in rows] == list(range(1, 41))
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert all(r["grad_norm"] >= 0 and r["tokens"] > 0 for r in rows)
    spec = EmbeddingSpec.load(d)
    assert spec.stages == [] and spec.extra["pretrained"] == "generative" and spec.extra["steps"] == 40
    assert spec.extra["curriculum_steps"] == 10  # 0.25 x 40 steps of short image-only answers first
    # the vision tower was aligned contrastively first (captions of the 24 scenes), scored on held-out captions
    al = spec.extra["vision_align"]
    assert al["steps"] == 6 and al["batch_size"] == 8 and al["loss_first"] > 0
    assert [r["step"] for r in P.read_metrics(d, P.ALIGN_METRICS_FILE)] == list(range(1, 7))
    assert al["heldout_after"]["n"] == 64 and 0 <= al["heldout_after"]["i2t_top1"] <= 1
    assert al["heldout_after"]["feature_cosine"] != al["heldout_before"]["feature_cosine"]
    assert spec.extra["examples_by_kind"]["caption"] == 24 and spec.extra["skipped_too_long"] == 0
    assert spec.eos_token_id == 0 and spec.mask_token_id == 7
    # the end-of-run check that the model uses the image: held-out loss with right vs. shuffled images
    gap = spec.extra["image_gap"]
    assert set(gap) == {"pair", "caption", "objects"}
    for v in gap.values():
        assert v["right"] > 0 and v["shuffled"] > 0 and v["ratio"] == pytest.approx(v["shuffled"] / v["right"], abs=2e-3)
    model = AutoModelForImageTextToText.from_pretrained(d)
    proc = AutoProcessor.from_pretrained(d)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration" and proc.tokenizer.pad_token == "<|endoftext|>"
    base = AutoModelForImageTextToText.from_pretrained(spec.extra["base"])
    assert not torch.equal(base.lm_head.weight, model.lm_head.weight)  # it trained


def test_second_call_hits_the_cache(pretrained, pairs_root, monkeypatch):
    d, kw, cache = pretrained
    monkeypatch.setenv("COCOA_CACHE", str(cache))
    monkeypatch.setattr(P, "pretrain", lambda *a, **k: pytest.fail("pre-trained again despite the cache"))
    assert P.pretrained_tiny_dir(pairs_root, steps=40, seed=0, **kw) == d
    # the CLI resolves the same settings to the same cached model and copies it to --out
    from cocoa.cli.train import cli

    out = cache.parent / "copy"
    args = ["pretrain-tiny", "--data", str(pairs_root), "--steps", "40", "--seed", "0", "--base", kw["base"],
            "--batch-size", "8", "--lr", "0.002", "--curriculum", "0.25", "--align-steps", "6", "--align-batch-size", "8",
            "--no-progress", "--out", str(out)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "cached model" in res.output and "loss" in res.output and "image gap" in res.output
    assert "vision alignment: 6 steps" in res.output and "held-out image->caption top-1" in res.output
    assert (out / "model.safetensors").read_bytes() == (d / "model.safetensors").read_bytes()
    # other settings are another model (the key covers steps, seed, lr...)
    assert P.cache_key(P.PretrainConfig(steps=41, base=kw["base"]), "k") != P.cache_key(P.PretrainConfig(steps=40, base=kw["base"]), "k")
    assert P.cache_key(P.PretrainConfig(seed=1), "k") != P.cache_key(P.PretrainConfig(seed=0), "k")
    assert P.cache_key(P.PretrainConfig(align_steps=0), "k") != P.cache_key(P.PretrainConfig(), "k")
    assert len([p for p in (cache / "pretrained").iterdir() if not p.name.endswith(".lock")]) == 1  # no leftovers


def test_examples_and_labels_cover_only_the_response(pairs_root, tiny_model_dir):
    from transformers import AutoProcessor

    recs, root = P.load_records(pairs_root, P.PretrainConfig())
    exs = [e for r in recs for e in P.examples_from_record(r)]
    kinds = {e.kind for e in exs}
    assert kinds == {"pair", "caption", "grounding", "count", "objects"}
    # text-positive pairs keep their text; image-positive pairs (t2i retrieval, grounding) give no "pair"
    for r in recs:
        got = [e for e in P.examples_from_record(r) if e.kind == "pair"]
        assert bool(got) == (r.qry_image is not None and r.pos_image is None)
    proc = AutoProcessor.from_pretrained(tiny_model_dir)
    b = P._Batcher(proc, "<|endoftext|>", 160, root)
    sample = exs[:6]
    batch = b(sample)
    for i, ex in enumerate(sample):
        lab = batch["labels"][i]
        resp = proc.tokenizer.decode(lab[lab != -100])
        assert resp == ex.response + "<|endoftext|>"
        assert (batch["input_ids"][i] == proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum() == 16
    # the response-only loss equals the HF model's own loss with these labels
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        assert torch.allclose(P.response_loss(model, batch), model(**batch).loss, atol=1e-5)


def test_describe_scene():
    scene = {"objects": [
        {"shape": "cube", "color": "red", "size": "large", "material": "metallic", "x": 0.2, "y": 0.2, "text": "K"},
        {"shape": "sphere", "color": "blue", "size": "small", "material": "matte", "x": 0.8, "y": 0.5, "text": None},
    ], "relations": [{"subject": 0, "relation": "left of", "object": 1}, {"subject": 1, "relation": "right of", "object": 0}]}
    cap = P.describe_scene(scene, random.Random(0))
    assert cap.startswith("2 objects: a large metallic red cube with 'K' printed on it at the top left")
    assert "a small matte blue sphere on the right" in cap
    assert "The red cube is left of the blue sphere." in cap
    with pytest.raises(RecordError, match="scene graph"):
        P.describe_scene({"objects": [{"shape": "cube"}]}, random.Random(0))
    # objects are listed in reading order (top band first, then left to right), whatever the graph's order:
    # the image determines every word of the caption
    flipped = {"objects": scene["objects"][::-1], "relations": []}
    assert P.describe_scene(flipped, random.Random(0)).startswith("2 objects: a large metallic red cube")
    three = {"objects": [dict(scene["objects"][1], y=0.9), dict(scene["objects"][0], x=0.9), scene["objects"][0]]}
    assert P.describe_objects(three) == "red cube, red cube, blue sphere"
    assert [o["x"] for o in P.reading_order(three["objects"])] == [0.2, 0.9, 0.8]


def test_image_gap_sees_a_model_that_reads_the_image(tiny_model_dir):
    """image_gap really swaps the images: the random-init model's loss changes when they are shuffled,
    and the ratio is exactly 1 once the image features are zeroed (a model that cannot see)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    proc = AutoProcessor.from_pretrained(tiny_model_dir)
    exs = P.heldout_examples(n_scenes=8)
    assert {e.kind for e in exs} == {"pair", "caption", "objects"}
    seeing = P.image_gap(model, proc, "<|endoftext|>", exs, per_kind=8, batch_size=8)
    assert any(abs(v["shuffled"] - v["right"]) > 1e-4 for v in seeing.values()), seeing
    with torch.no_grad():
        for p in model.model.visual.merger.mlp[2].parameters():
            p.zero_()
    blind = P.image_gap(model, proc, "<|endoftext|>", exs, per_kind=8, batch_size=8)
    assert set(blind) == {"pair", "caption", "objects"}
    assert all(v["ratio"] == pytest.approx(1.0, abs=1e-4) for v in blind.values()), blind


def test_bad_input(tmp_path, tiny_model_dir):
    with pytest.raises(RecordError, match="no PairRecord shards"):
        P.pretrained_tiny_dir(tmp_path, steps=2)
    from cocoa.records import EvalRecord

    write_records(tmp_path / "ev", "EvalRecord", [EvalRecord(dataset="d", meta_task="vqa", split="IND", qry_text="q",
                                                              tgt_texts=["a"], tgt_images=[None])])
    with pytest.raises(RecordError, match="EvalRecord"):
        P.pretrained_tiny_dir(tmp_path / "ev", steps=2)
    # text-only pairs give nothing to learn from images: a clear error, not an empty run
    write_records(tmp_path / "txt" / "original", "PairRecord", [PairRecord(source="s", qry_text="q", pos_text="p")])
    with pytest.raises(RecordError, match="no generative examples"):
        P.pretrain(P.PretrainConfig(data=str(tmp_path / "txt"), steps=2, base=str(tiny_model_dir), progress=False),
                   tmp_path / "o")
    with pytest.raises(RecordError, match="not a saved model"):
        P.pretrained_tiny_dir(tmp_path / "txt", steps=2, base=str(tmp_path))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    from cocoa.cli.train import cli

    res = CliRunner().invoke(cli, ["pretrain-tiny", "--data", str(tmp_path / "txt"), "--out", str(tmp_path / "busy")])
    assert res.exit_code == 2 and "--overwrite" in res.output
    res = CliRunner().invoke(cli, ["pretrain-tiny", "--data", str(tmp_path / "nope"), "--base", str(tiny_model_dir),
                                   "--no-progress"])
    assert res.exit_code == 1 and "no PairRecord shards" in res.output
    assert json.loads((tiny_model_dir / "cocoa.json").read_text())["stages"] == []
