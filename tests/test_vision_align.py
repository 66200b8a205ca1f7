"""Contrastive alignment of the vision tower before generative pre-training (cocoa.tiny.vision_align)."""

import pytest
import torch

from cocoa.tiny.vision_align import BagOfWords, align_vision, mean_offdiag_cosine


@pytest.fixture(scope="module")
def scene_pairs():
    from cocoa.sources import scenes
    from cocoa.tiny.pretrain import examples_from_record

    exs = [ex for rec in scenes.iter_train_pairs(24, seed=5) for ex in examples_from_record(rec) if ex.kind == "caption"]
    return [((lambda ex=ex: ex.image.load(None)), ex.response) for ex in exs]


def _load(d):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32), AutoProcessor.from_pretrained(d)


def test_bag_of_words_mean_pools_and_refuses_empty_text():
    torch.manual_seed(0)
    bow = BagOfWords(10, 4)
    out = bow([[1, 2], [3]])
    with torch.no_grad():
        want0 = bow.proj((bow.emb.weight[1] + bow.emb.weight[2]) / 2)
        want1 = bow.proj(bow.emb.weight[3])
    assert torch.allclose(out[0], want0, atol=1e-6) and torch.allclose(out[1], want1, atol=1e-6)
    with pytest.raises(ValueError, match="tokenized to nothing"):
        bow([[1], []])


def test_mean_offdiag_cosine():
    assert mean_offdiag_cosine(torch.ones(3, 4)) == pytest.approx(1.0)
    assert mean_offdiag_cosine(torch.eye(4)) == pytest.approx(0.0)
    assert mean_offdiag_cosine(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-1.0)


def test_alignment_trains_only_the_vision_tower_and_separates_images(tiny_model_dir, scene_pairs):
    model, proc = _load(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train, held = scene_pairs[:16], scene_pairs[16:]
    out = align_vision(model, proc, train, steps=40, batch_size=16, lr=1e-3, seed=0, heldout=held)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".visual." in f".{n}" for n in changed), sorted(changed)[:5]
    assert any("merger" in n for n in changed) and any("patch_embed" in n for n in changed)
    assert out["steps"] == 40 and out["batch_size"] == 16
    # 16 pairs, the same ones every step: the loss falls well below ln 16 = 2.77
    assert out["loss_last"] < 0.5 * out["loss_first"], out
    # a random vision tower barely tells scenes apart (grey background); after alignment it does
    assert out["heldout_before"]["feature_cosine"] > 0.9
    assert out["heldout_after"]["feature_cosine"] < out["heldout_before"]["feature_cosine"] - 0.1, out
    assert out["heldout_after"]["n"] == len(held)


def test_alignment_is_deterministic(tiny_model_dir, scene_pairs):
    a, proc = _load(tiny_model_dir)
    b, _ = _load(tiny_model_dir)
    align_vision(a, proc, scene_pairs, steps=3, batch_size=8, seed=1)
    align_vision(b, proc, scene_pairs, steps=3, batch_size=8, seed=1)
    for (n, p), (_, q) in zip(a.model.visual.named_parameters(), b.model.visual.named_parameters()):
        assert torch.equal(p, q), n


def test_bad_input(tiny_model_dir, scene_pairs):
    model, proc = _load(tiny_model_dir)
    with pytest.raises(ValueError, match="at least 2"):
        align_vision(model, proc, scene_pairs[:1], steps=1)
    with pytest.raises(ValueError, match="steps >= 1"):
        align_vision(model, proc, scene_pairs, steps=0)
