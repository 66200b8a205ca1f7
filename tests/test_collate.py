"""Collators with the tiny model's real processor: layouts, labels, image expansion, truncation policy."""

import logging

import pytest
import torch
from PIL import Image

from cocoa.records import ImageRef, MixRecord
from cocoa.model.collate import (
    IMAGE_BLOCK,
    CollateError,
    EmbedCollator,
    Stage1Collator,
    Stage2Collator,
    render_text,
)
from cocoa.model.objectives import IGNORE
from cocoa.model.spec import EmbeddingSpec


@pytest.fixture(scope="module")
def proc(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir), EmbeddingSpec.load(tiny_model_dir)


def img(color=(255, 0, 0), size=112):
    return Image.new("RGB", (size, size), color)


def rec(text, prompt="", image=True, color=(255, 0, 0)):
    return MixRecord(origin="original", origin_id=text + prompt, stages=[1, 2],
                     image=ImageRef.from_pil(img(color)) if image else None, prompt=prompt, text=text)


def ids_of(tok, *names):
    return [tok.convert_tokens_to_ids(n) for n in names]


def test_render_text_placeholder():
    assert render_text("<|image_1|> Represent it", True) == IMAGE_BLOCK + " Represent it"
    assert render_text("Find it", True) == IMAGE_BLOCK + "Find it"
    assert render_text("<|image_1|> text only", False) == "text only"
    assert render_text("a <|image_1|> b <|image_1|>", True) == "a " + IMAGE_BLOCK + " b "


def test_stage1_sequence_labels_and_mae(proc):
    p, spec = proc
    tok = p.tokenizer
    vs, ve, pad_img, mask_id = ids_of(tok, "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|mask|>")
    c = Stage1Collator(p, spec, text_mask_ratio=0.5, image_mask_ratio=0.5, seed=0)
    records = [rec("red circle on the left", prompt="What is shown?"), rec("a blue square", color=(0, 0, 255))]
    b = c(records)
    ids = b["input_ids"]
    # image block first, 16 image tokens for a 112x112 image (8x8 patches / 2x2 merge)
    assert ids[0, 0] == vs and ids[0, 17] == ve and bool((ids[:, 1:17] == pad_img).all())
    assert torch.equal(b["mm_token_type_ids"][0, :18], torch.tensor([0] + [1] * 16 + [0]))
    # unmasked text round-trips: (prompt + " " + text).strip()
    orig = torch.where(b["labels"] != IGNORE, b["labels"], ids)
    n0 = int(b["attention_mask"][0].sum())
    assert tok.decode(orig[0, 18:n0]) == "What is shown? red circle on the left"
    # MNTP never masks image/special tokens; masked positions hold <|mask|>
    masked = b["labels"] != IGNORE
    assert bool((ids[masked] == mask_id).all())
    special = set(tok.all_special_ids)
    assert all(int(t) not in special for t in b["labels"][masked])
    assert not bool(masked[:, :18].any())
    # ratio per sample over text tokens
    for i in range(2):
        n_text = int(b["attention_mask"][i].sum()) - 18
        assert int(masked[i].sum()) == max(1, round(0.5 * n_text))
    # MAE: 2 images x 16 units, half masked per image, clean pixels kept as targets
    assert b["image_unit_mask"].shape == (32,) and int(b["image_unit_mask"][:16].sum()) == 8
    assert b["pixel_values"].shape == b["pixel_values_clean"].shape == (128, 1176)
    changed = (b["pixel_values"] != b["pixel_values_clean"]).any(-1).view(32, 4).all(-1)
    assert torch.equal(changed, b["image_unit_mask"])
    assert b["eos_pos"].tolist() == [-1, -1]


def test_stage2_layout(proc):
    p, spec = proc
    tok = p.tokenizer
    c = Stage2Collator(p, spec, b_mask_ratio=0.7, seed=1)
    b = c([rec("a red circle", prompt="Describe the image."), rec("blue", prompt="What color?", color=(0, 0, 255))])
    eos = b["eos_pos"]
    for i in range(2):
        e = int(eos[i])
        assert b["input_ids"][i, e] == spec.eos_token_id
        n = int(b["attention_mask"][i].sum())
        masked = (b["labels"][i] != IGNORE).nonzero().flatten()
        # labels only in B; 70% of B masked
        assert bool((masked > e).all()) and len(masked) == max(1, round(0.7 * (n - e - 1)))
        orig_b = torch.where(b["labels"][i] != IGNORE, b["labels"][i], b["input_ids"][i])[e + 1 : n]
        assert tok.decode(orig_b) == ["a red circle", "blue"][i]
    a_text = tok.decode(b["input_ids"][0, 18 : int(eos[0])])
    assert a_text == "Describe the image."


def test_left_padding(proc):
    p, spec = proc
    c = EmbedCollator(p, spec, padding_side="left")
    b = c([("a red circle on the left of the blue square", None), ("red", None)])
    L = b["input_ids"].shape[1]
    assert b["eos_pos"].tolist() == [L - 1, L - 1]
    assert b["attention_mask"][1, 0] == 0 and b["attention_mask"][1, -1] == 1


def test_embed_collator_instruction_and_eos(proc):
    p, spec = proc
    tok = p.tokenizer
    c = EmbedCollator(p, spec, instruction="Represent the given image.")
    b = c([("<|image_1|> a red circle", img()), ("a blue square", None)])
    e0, e1 = b["eos_pos"].tolist()
    assert b["input_ids"][0, e0] == spec.eos_token_id and b["input_ids"][1, e1] == spec.eos_token_id
    # the placeholder is replaced in place: instruction, then the image block, then the text
    text0 = tok.decode(b["input_ids"][0, : e0], skip_special_tokens=False)
    assert text0.startswith("Represent the given image. <|vision_start|><|image_pad|>")
    assert text0.endswith("<|vision_end|> a red circle")
    assert b["image_grid_thw"].tolist() == [[1, 8, 8]] and b["pixel_values"].shape == (64, 1176)


def test_truncation_never_cuts_image(proc, caplog):
    p, spec = proc
    # 16 image tokens + 2 markers = 18; max_length 20 leaves 2 text tokens
    c1 = Stage1Collator(p, spec, max_length=20)
    b = c1([rec("a red circle on the left of a blue square")])
    assert b["input_ids"].shape[1] == 20 and c1.stats["truncated"] == 1
    # an image larger than max_length: rejected, counted, warned (a 56 px image = 4 tokens still fits)
    c_small = Stage1Collator(p, spec, max_length=10)
    big = MixRecord(origin="original", origin_id="big", stages=[1], image=ImageRef.from_pil(img(size=112)), text="big")
    small = MixRecord(origin="original", origin_id="small", stages=[1], image=ImageRef.from_pil(img(size=56)), text="red")
    with caplog.at_level(logging.WARNING, logger="cocoa.model.collate"):
        out = c_small([big, small])
    assert out["input_ids"].shape[0] == 1 and c_small.stats["rejected"] == 1
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert "rejected record" in caplog.text and big.id in caplog.text
    assert c_small([big]) is None and c_small.stats["rejected_image_exceeds_max_length"] == 2
    # stage 2: B trimmed first (kept >= 1 token), A's image never cut
    c2 = Stage2Collator(p, spec, max_length=21)
    b2 = c2([rec("a red circle on the left", prompt="Describe")])
    e = int(b2["eos_pos"][0])
    assert b2["input_ids"].shape[1] == 21 and e >= 18
    c2b = Stage2Collator(p, spec, max_length=19)
    assert c2b([rec("a red circle", prompt="Describe the image in detail")]) is None
    assert c2b.stats["rejected"] == 1
    # embedding items are never dropped: clear error
    ce = EmbedCollator(p, spec, max_length=19)
    assert ce([("x", img())])["input_ids"].shape[1] == 19
    with pytest.raises(CollateError, match="max_length"):
        EmbedCollator(p, spec, max_length=10)([("x", img(size=112))])


def test_max_length_too_small_for_one_image(proc):
    p, spec = proc
    with pytest.raises(CollateError, match="too small for one image"):
        Stage1Collator(p, spec, max_length=5)


def test_image_from_path_under_root(proc, tmp_path):
    p, spec = proc
    img().save(tmp_path / "a.png")
    r = MixRecord(origin="original", origin_id="p", stages=[2], image=ImageRef(path="a.png"), prompt="Q", text="red")
    b = Stage2Collator(p, spec, image_root=tmp_path)([r])
    assert b["pixel_values"].shape == (64, 1176)
    with pytest.raises(Exception, match="no data root|relative"):
        Stage2Collator(p, spec)([r])


def test_processor_row_order_is_merge_units(proc):
    """One LLM image token = 4 consecutive pixel_values rows: paint one 28x28 block and find its rows."""
    p, spec = proc
    im = Image.new("RGB", (112, 112), (0, 0, 0))
    # the merge unit at grid row 1, col 2 (of 4x4 units) covers pixels y 28..55, x 56..83
    for y in range(28, 56):
        for x in range(56, 84):
            im.putpixel((x, y), (255, 255, 255))
    out = p.image_processor(images=[im], return_tensors="pt")
    pv = out["pixel_values"]
    bright = (pv.mean(-1) > 0).nonzero().flatten().tolist()
    unit = 1 * 4 + 2
    assert bright == list(range(unit * 4, unit * 4 + 4))
