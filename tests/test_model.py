"""CocoaModel behaviour on the real tiny Qwen2-VL: masks reach attention, stage-2 information flow, GradCache."""

import copy
import inspect

import pytest
import torch
from PIL import Image

from cocoa.records import ImageRef, MixRecord
from cocoa.model.collate import EmbedCollator, Stage2Collator
from cocoa.model.wrapper import CocoaModel, call_filtered, ensure_mask_token
from cocoa.model.spec import EmbeddingSpec


@pytest.fixture(scope="module")
def cm(tiny_model_dir):
    torch.manual_seed(0)
    m = CocoaModel.from_pretrained(tiny_model_dir)
    m.eval()
    return m


def one_layer(m: CocoaModel) -> CocoaModel:
    m1 = copy.deepcopy(m)
    lm = m1.inner.language_model
    lm.layers = lm.layers[:1]
    m1.hf_config.text_config.num_hidden_layers = 1
    return m1


def img(color):
    return Image.new("RGB", (112, 112), color)


def embed_batch(m, items):
    return EmbedCollator(m.processor, m.spec)(items)


def test_loaded_spec_and_tokens(cm, tiny_model_dir):
    assert cm.spec.eos_token == "<|endoftext|>" and cm.spec.eos_token_id == 0
    assert cm.spec.mask_token_id == cm.processor.tokenizer.convert_tokens_to_ids("<|mask|>")
    assert cm.attn_implementation == "sdpa"


@pytest.mark.parametrize("with_image", [False, True])
def test_bidirectional_first_position_sees_later_tokens(cm, with_image):
    image = img((200, 30, 30)) if with_image else None
    b1 = embed_batch(cm, [("a red circle on the left", image)])
    b2 = embed_batch(cm, [("a red circle on the right", image)])
    assert b1["input_ids"].shape == b2["input_ids"].shape
    diff_pos = (b1["input_ids"] != b2["input_ids"]).nonzero()[0, 1]
    assert diff_pos > 3
    with torch.no_grad():
        for kind, should_change in (("bidirectional", True), ("causal", False)):
            h1 = cm.forward_hidden(b1, kind)
            h2 = cm.forward_hidden(b2, kind)
            changed = not torch.allclose(h1[0, 0], h2[0, 0], atol=1e-6)
            assert changed == should_change, kind
            # positions before the change never differ under causal
            if kind == "causal":
                assert torch.allclose(h1[0, :diff_pos], h2[0, :diff_pos], atol=1e-6)


def s2_batch(m, prompt, color, text="a red circle on the left"):
    r = MixRecord(origin="original", origin_id="x", stages=[2], image=ImageRef.from_pil(img(color)), prompt=prompt, text=text)
    return Stage2Collator(m.processor, m.spec, b_mask_ratio=0.0)([r])


@pytest.mark.parametrize("variant", ["collaborative", "collaborative_strict"])
def test_collaborative_one_layer_b_blind_to_a_two_layers_not(cm, variant):
    ba = s2_batch(cm, "What is the colour?", (200, 30, 30))
    bb = s2_batch(cm, "What is the shape?", (30, 30, 200))  # A differs in text and image, same length
    assert ba["input_ids"].shape == bb["input_ids"].shape
    e = int(ba["eos_pos"][0])
    assert int(bb["eos_pos"][0]) == e
    m1 = one_layer(cm)
    with torch.no_grad():
        h1a, h1b = m1.forward_hidden(ba, variant), m1.forward_hidden(bb, variant)
        # one layer: B (after EOS) cannot see A; A itself changed
        assert torch.allclose(h1a[0, e + 1 :], h1b[0, e + 1 :], atol=1e-6)
        assert not torch.allclose(h1a[0, :e], h1b[0, :e], atol=1e-4)
        # EOS sees A: its output changes even with one layer
        assert not torch.allclose(h1a[0, e], h1b[0, e], atol=1e-6)
        # two (here four) layers: A reaches B through EOS
        h2a, h2b = cm.forward_hidden(ba, variant), cm.forward_hidden(bb, variant)
        assert not torch.allclose(h2a[0, e + 1 :], h2b[0, e + 1 :], atol=1e-5)
        # bidirectional one layer: B sees A directly
        ha, hb = m1.forward_hidden(ba, "bidirectional"), m1.forward_hidden(bb, "bidirectional")
        assert not torch.allclose(ha[0, e + 1 :], hb[0, e + 1 :], atol=1e-5)


def _grads_to_inputs(m: CocoaModel, batch, stop_at_eos: bool):
    """Gradient of the stage-2 loss w.r.t. the token embeddings and pixel_values, optionally with a
    stop-gradient on the EOS position after every decoder layer."""
    e = int(batch["eos_pos"][0])
    store = {}
    hooks = []

    def emb_hook(mod, inp, out):
        out.retain_grad()
        store["emb"] = out
        return out

    hooks.append(m.inner.get_input_embeddings().register_forward_hook(emb_hook))
    if stop_at_eos:
        def stop(mod, inp, out):
            h = out[0] if isinstance(out, tuple) else out
            h = h.clone()
            h[:, e] = h[:, e].detach()
            return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

        for layer in m.inner.language_model.layers:
            hooks.append(layer.register_forward_hook(stop))
    batch = dict(batch)
    batch["pixel_values"] = batch["pixel_values"].clone().requires_grad_(True)
    try:
        loss, _ = m.stage2_loss(batch)
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    m.zero_grad()
    return store["emb"].grad[0], batch["pixel_values"].grad, e


def test_stage2_gradient_reaches_a_only_through_eos(cm):
    r = MixRecord(origin="original", origin_id="g", stages=[2], image=ImageRef.from_pil(img((200, 30, 30))),
                  prompt="What is the colour?", text="a red circle on the left of the square")
    batch = Stage2Collator(cm.processor, cm.spec, b_mask_ratio=0.7, seed=0)(r for r in [r])
    g_open, pix_open, e = _grads_to_inputs(cm, batch, stop_at_eos=False)
    g_stop, pix_stop, _ = _grads_to_inputs(cm, batch, stop_at_eos=True)
    # with the EOS path open, A (text tokens and the image) receives gradient
    assert g_open[:e].abs().sum() > 0 and pix_open.abs().sum() > 0
    # with a stop-gradient at EOS, A receives exactly none: B never attends A directly
    assert g_stop[:e].abs().sum() == 0 and pix_stop.abs().sum() == 0
    # B still gets gradient in both cases
    assert g_stop[e + 1 :].abs().sum() > 0


def test_eager_and_flex_match_sdpa(tiny_model_dir, cm):
    b = s2_batch(cm, "What is the colour?", (200, 30, 30))
    b2 = embed_batch(cm, [("a red circle", img((10, 200, 10))), ("a longer text only sample here", None)])
    with torch.no_grad():
        ref = cm.forward_hidden(b, "collaborative")
        ref2 = cm.forward_hidden(b2, "bidirectional")
        eager = CocoaModel.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
        assert torch.allclose(eager.forward_hidden(b, "collaborative"), ref, atol=1e-5)
        assert torch.allclose(eager.forward_hidden(b2, "bidirectional"), ref2, atol=1e-5)
        flex = CocoaModel.from_pretrained(tiny_model_dir, attn_implementation="cocoa_flex").eval()
        assert flex.attn_implementation == "cocoa_flex"
        assert torch.allclose(flex.forward_hidden(b, "collaborative"), ref, atol=1e-4)
        # real tokens of the padded batch agree (padded positions are don't-care)
        real = b2["attention_mask"].bool()
        assert torch.allclose(flex.forward_hidden(b2, "bidirectional")[real], ref2[real], atol=1e-4)


def test_embed_is_normalised_eos_state(cm):
    b = embed_batch(cm, [("a red circle", img((200, 30, 30))), ("blue square", None)])
    with torch.no_grad():
        e = cm.embed(b)
        h = cm.forward_hidden(b, "bidirectional")
    assert e.shape == (2, cm.hf_config.text_config.hidden_size)
    assert torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-5)
    idx = b["eos_pos"]
    assert torch.allclose(e, torch.nn.functional.normalize(h[torch.arange(2), idx], dim=-1), atol=1e-6)


def test_grad_cache_equals_full_batch_on_tiny_model(cm):
    m = copy.deepcopy(cm)
    m.train()
    texts = ["a red circle", "a blue square", "green triangle", "the yellow star", "two circles", "a pink heart"]
    colors = [(200, 30, 30), (30, 30, 200), (30, 200, 30), (200, 200, 30), (120, 120, 120), (250, 150, 200)]
    c = EmbedCollator(m.processor, m.spec)
    q_items = [("<|image_1|> what is this?", img(col)) for col in colors]
    t_items = [(t, None) for t in texts]
    qb, tb = c(q_items), c(t_items)
    loss_full, _ = m.stage3_loss(qb, tb, temperature=0.05)
    loss_full.backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    qc = [c(q_items[i : i + 2]) for i in range(0, 6, 2)]
    tc = [c(t_items[i : i + 3]) for i in range(0, 6, 3)]
    loss_gc, _ = m.stage3_grad_cache_step(qc, tc, temperature=0.05)
    got = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert loss_gc.item() == pytest.approx(loss_full.item(), rel=1e-5)
    assert set(got) == set(ref) and len(ref) > 10
    for n in ref:
        # fp32 summation order differs between chunked and full passes: compare at 1e-6 of the scale
        scale = max(1.0, ref[n].abs().max().item())
        assert torch.allclose(got[n], ref[n], atol=1e-6 * scale, rtol=1e-4), (n, (got[n] - ref[n]).abs().max().item())


def test_save_and_reload_round_trip(cm, tmp_path):
    b = embed_batch(cm, [("a red circle", img((200, 30, 30)))])
    cm.ensure_image_decoder()
    out = cm.save_pretrained(tmp_path / "m", stages=[1, 2], save_image_decoder=True)
    spec = EmbeddingSpec.load(out)
    assert spec.stages == [1, 2] and spec.eos_token_id == cm.spec.eos_token_id
    m2 = CocoaModel.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.allclose(m2.embed(b), cm.embed(b), atol=1e-6)
    assert m2.image_decoder is not None
    for (k, v), (k2, v2) in zip(cm.image_decoder.state_dict().items(), m2.image_decoder.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_mask_token_added_without_resize_when_rows_spare(tiny_model_dir):
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    tok = AutoProcessor.from_pretrained(tiny_model_dir).tokenizer
    n = len(tok)
    model.resize_token_embeddings(n + 64)  # like Qwen: embedding matrix padded beyond the vocabulary
    tid = ensure_mask_token(tok, model, "<|newmask|>")
    assert tid == n and model.get_input_embeddings().weight.shape[0] == n + 64
    tid2 = ensure_mask_token(tok, model, "<|newmask|>")  # idempotent
    assert tid2 == tid
    model2 = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    tok2 = AutoProcessor.from_pretrained(tiny_model_dir).tokenizer
    tid3 = ensure_mask_token(tok2, model2, "<|newmask|>")  # no spare rows: resized to fit
    assert model2.get_input_embeddings().weight.shape[0] >= tid3 + 1


def test_call_filtered_handles_older_get_rope_index_signature():
    seen = {}

    def old_style(input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None):  # transformers 5.17
        seen.update(input_ids=input_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask)
        return "ok"

    assert call_filtered(old_style, input_ids=1, mm_token_type_ids=2, image_grid_thw=3, attention_mask=4) == "ok"
    assert seen == {"input_ids": 1, "image_grid_thw": 3, "attention_mask": 4}
    assert "mm_token_type_ids" not in inspect.signature(old_style).parameters


def test_call_filtered_drops_unnamed_kwargs_even_with_catch_all():
    def fwd(input_ids=None, attention_mask=None, **kwargs):  # 5.17-style forward with a **kwargs catch-all
        return kwargs

    assert call_filtered(fwd, input_ids=1, attention_mask=2, mm_token_type_ids=3) == {}


def test_qwen2_5_vl_wrapper_collaborative_and_stage1():
    """The same wrapper on Qwen2.5-VL (window-attention ViT, same processor row order)."""
    from cocoa.model.collate import Stage1Collator
    from cocoa.tiny.build import tiny_model_dir

    m = CocoaModel.from_pretrained(tiny_model_dir(arch="qwen2.5-vl")).eval()
    assert type(m.base).__name__ == "Qwen2_5_VLForConditionalGeneration"
    ba = s2_batch(m, "What is the colour?", (200, 30, 30))
    bb = s2_batch(m, "What is the shape?", (30, 30, 200))
    e = int(ba["eos_pos"][0])
    m1 = one_layer(m)
    with torch.no_grad():
        assert torch.allclose(m1.forward_hidden(ba, "collaborative")[0, e + 1 :],
                              m1.forward_hidden(bb, "collaborative")[0, e + 1 :], atol=1e-6)
        assert not torch.allclose(m.forward_hidden(ba, "collaborative")[0, e + 1 :],
                                  m.forward_hidden(bb, "collaborative")[0, e + 1 :], atol=1e-5)
    r = MixRecord(origin="original", origin_id="q25", stages=[1], image=ImageRef.from_pil(img((9, 9, 9))),
                  text="a red circle on the left")
    loss, metrics = m.stage1_loss(Stage1Collator(m.processor, m.spec, seed=0)([r]))
    assert torch.isfinite(loss) and metrics["n_masked_units"] == 8 and metrics["mae"] > 0
