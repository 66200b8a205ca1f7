"""The offline tiny Qwen2-VL / Qwen2.5-VL: saved, reloaded the user's way, run on CPU."""

import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cocoa.records import RecordError
from cocoa.tiny import build as tiny
from cocoa.model.spec import EmbeddingSpec


@pytest.fixture(scope="module")
def tiny25_dir(tmp_path_factory):
    """The Qwen2.5-VL variant, built through the CLI (`cocoa-train tiny-model`)."""
    from cocoa.cli.train import cli

    out = tmp_path_factory.mktemp("tiny25") / "qwen2.5-vl"
    res = CliRunner().invoke(cli, ["tiny-model", "--out", str(out), "--arch", "qwen2.5-vl", "--seed", "0"])
    assert res.exit_code == 0, res.output
    assert "parameters" in res.output
    return out


def _image(seed: int, size: int = 112) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


def _check_forward(model_dir, expected_cls):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    assert type(model).__name__ == expected_cls
    proc = AutoProcessor.from_pretrained(model_dir)
    cfg = model.config
    texts = ["<|vision_start|><|image_pad|><|vision_end|>What color is the small cube?<|endoftext|>",
             "<|vision_start|><|image_pad|><|vision_end|>a photo with a red cube and a blue sphere<|endoftext|>"]
    images = [_image(0), _image(1, size=84)]  # two sizes: 112 px -> 16 tokens, 84 px -> 9 tokens
    batch = proc(text=texts, images=images, return_tensors="pt", padding=True)
    merge = proc.image_processor.merge_size
    expected = [int(t.prod()) // merge**2 for t in batch["image_grid_thw"]]
    assert expected[0] == 16  # 112 px / 14 = 8x8 patches -> 4x4 after the 2x2 merge
    n_pad = (batch["input_ids"] == cfg.image_token_id).sum(1).tolist()
    assert n_pad == expected
    assert "mm_token_type_ids" in batch and batch["mm_token_type_ids"].sum().item() == sum(expected)
    with torch.no_grad():
        feats = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        n_feats = sum(f.shape[0] for f in feats) if isinstance(feats, (list, tuple)) else feats.shape[0]
        assert n_feats == sum(expected)
        out = model(**batch)  # raises on an image features / tokens mismatch
    assert out.logits.shape == (*batch["input_ids"].shape, cfg.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()
    return model, proc


def test_tiny_qwen2vl_reloads_and_runs_forward_with_an_image(tiny_model_dir):
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    files = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "cocoa.json"} <= files
    model, proc = _check_forward(tiny_model_dir, "Qwen2VLForConditionalGeneration")
    assert isinstance(proc, Qwen2VLProcessor)
    n = sum(p.numel() for p in model.parameters())
    assert 2_000_000 < n < 8_000_000
    assert EmbeddingSpec.load(tiny_model_dir).extra["num_parameters"] == n
    # the concrete class loads the same directory too
    m2 = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    assert torch.equal(m2.lm_head.weight, model.lm_head.weight)
    # generation works through the standard API (KV cache, M-RoPE deltas)
    batch = proc(text=["<|vision_start|><|image_pad|><|vision_end|>What is in the image?"], images=[_image(3)],
                 return_tensors="pt")
    gen = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == batch["input_ids"].shape[1] + 4 or gen[0, -1].item() in (0, 2)


def test_tiny_qwen25vl_variant(tiny25_dir):
    from transformers import Qwen2_5_VLProcessor

    _, proc = _check_forward(tiny25_dir, "Qwen2_5_VLForConditionalGeneration")
    assert isinstance(proc, Qwen2_5_VLProcessor)
    spec = EmbeddingSpec.load(tiny25_dir)
    assert spec.arch == "qwen2.5-vl" and spec.stages == []


@pytest.mark.parametrize("which", ["qwen2-vl", "qwen2.5-vl"])
def test_special_tokens_and_ids_match_config_and_spec(which, tiny_model_dir, tiny25_dir):
    from transformers import AutoConfig, AutoTokenizer

    d = tiny_model_dir if which == "qwen2-vl" else tiny25_dir
    tok = AutoTokenizer.from_pretrained(d)
    cfg = AutoConfig.from_pretrained(d)
    spec = EmbeddingSpec.load(d)
    ids = {t: tok.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(ids)
    for t, i in ids.items():  # each is one special token, kept whole and skipped when decoding
        assert tok(t, add_special_tokens=False)["input_ids"] == [i]
        assert tok.decode([i], skip_special_tokens=True) == ""
    assert spec.eos_token == "<|endoftext|>" and spec.eos_token_id == ids["<|endoftext|>"]
    assert spec.mask_token == "<|mask|>" and spec.mask_token_id == ids["<|mask|>"]
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == ids["<|endoftext|>"]
    assert tok.eos_token_id == ids["<|endoftext|>"]
    assert cfg.image_token_id == ids["<|image_pad|>"] and cfg.video_token_id == ids["<|video_pad|>"]
    assert cfg.vision_start_token_id == ids["<|vision_start|>"] and cfg.vision_end_token_id == ids["<|vision_end|>"]
    assert cfg.text_config.vocab_size == len(tok)
    assert cfg.text_config.eos_token_id == ids["<|endoftext|>"] and cfg.text_config.pad_token_id == ids["<|endoftext|>"]
    assert (spec.image_min_pixels, spec.image_max_pixels) == (tiny.MIN_PIXELS, tiny.MAX_PIXELS)
    assert 2000 <= len(tok) <= 8000


def test_tokenizer_round_trips_scenes_text(tiny_model_dir):
    from transformers import AutoTokenizer

    from cocoa.sources import scenes

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = []
    for r in scenes.iter_train_pairs(30, seed=1):
        texts += [r.qry_text, r.pos_text, " ".join(o.describe() for o in scenes.Scene.from_dict(r.meta["scene"]).objects)]
    texts += ["Which colour does the large striped cone have? 7", "Ünïcödé — émojis 🙂 and\ttabs\nnewlines"]
    n_tokens = n_words = 0
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == t
        n_tokens += len(ids)
        n_words += len(t.split())
    # the scenes vocabulary is in the BPE merges: about one token per word, not characters
    assert n_tokens < 1.6 * n_words
    for w in [" cube", " sphere", " cylinder", " metallic", " striped", " left", " purple", " How", " many"]:
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1, w


def test_deterministic_and_cached(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("COCOA_CACHE", str(tmp_path / "cache"))
    name = f"qwen2-vl-s0-{tiny.settings_key('qwen2-vl', seed=0)}"
    stale = tmp_path / "cache" / "tiny" / f".{name}.tmp-killed" / "model"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half-written")
    d = tiny.tiny_model_dir("qwen2-vl", seed=0)
    assert d.parent.parent == tmp_path / "cache" and d.name == name
    assert not stale.parent.exists()  # a killed builder's leftovers are cleared under the lock
    # same seed -> byte-identical files (weights, tokenizer, processor, spec)
    for f in sorted(p.name for p in tiny_model_dir.iterdir()):
        assert (d / f).read_bytes() == (tiny_model_dir / f).read_bytes(), f
    # second call: a cache hit, no rebuild, no temporary directories left
    monkeypatch.setattr(tiny, "build_tiny_model", lambda *a, **k: pytest.fail("rebuilt a cached model"))
    assert tiny.tiny_model_dir("qwen2-vl", seed=0) == d
    assert [p.name for p in d.parent.iterdir() if not p.name.endswith(".lock")] == [d.name]


def test_seed_changes_weights_not_tokenizer(tmp_path):
    from safetensors.torch import load_file

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, vision_embed_dim=32, vision_depth=1)
    a = tiny.build_tiny_model(tmp_path / "a", seed=0, **small)
    b = tiny.build_tiny_model(tmp_path / "b", seed=1, **small)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert any(not torch.equal(wa[k], wb[k]) for k in wa if wa[k].ndim == 2)
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["text_config"]["hidden_size"] == 64
    assert tiny.settings_key(seed=0, **small) != tiny.settings_key(seed=1, **small)


def test_bad_input(tmp_path):
    with pytest.raises(RecordError, match="unknown tiny-model arch"):
        tiny.build_tiny_model(tmp_path / "x", arch="llava")
    with pytest.raises(RecordError, match="unknown tiny-model setting"):
        tiny.build_tiny_model(tmp_path / "x", hidden_sise=64)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(RecordError, match="not empty"):
        tiny.build_tiny_model(tmp_path / "full")
    from cocoa.cli.train import cli

    res = CliRunner().invoke(cli, ["tiny-model", "--out", str(tmp_path / "full")])
    assert res.exit_code == 2 and "--overwrite" in res.output
    res = CliRunner().invoke(cli, ["tiny-model", "--out", str(tmp_path / "y"), "--arch", "llava"])
    assert res.exit_code == 2 and "qwen2.5-vl" in res.output
