"""bench/real_dims.py at reduced depth and real widths: Qwen2-VL-2B / Qwen2.5-VL-3B configs, the hub's special-token
ids, the paper preset (DoRA on LLM + ViT, GradCache, micro-batches of 1) through cocoa-train's own stages, merge,
reload with plain transformers and embedding with cocoa.Embedder."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "real_dims.py"


@pytest.fixture(scope="module")
def rd():
    spec = importlib.util.spec_from_file_location("real_dims", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("real_dims", mod)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("arch", ["qwen2-vl", "qwen2.5-vl"])
def test_tokenizer_has_the_hub_special_token_ids(rd, arch):
    tok = rd.qwen_tokenizer(arch)
    assert len(tok) == (151657 if arch == "qwen2-vl" else 151665)
    ids = {t: tok.convert_tokens_to_ids(t) for t in rd.QWEN2_SPECIALS}
    assert ids["<|endoftext|>"] == 151643 and ids["<|im_end|>"] == 151645
    assert ids["<|vision_start|>"] == 151652 and ids["<|vision_end|>"] == 151653
    assert ids["<|image_pad|>"] == 151655 and ids["<|video_pad|>"] == 151656
    assert tok.eos_token_id == 151645 and tok.pad_token_id == 151643
    # ordinary text never produces the filler ids, and a special token stays one token
    enc = tok("a red cube left of the blue sphere<|endoftext|>").input_ids
    assert enc[-1] == 151643 and max(enc[:-1]) < 5000
    assert tok.decode(enc[:-1]) == "a red cube left of the blue sphere"


@pytest.mark.parametrize("name", ["qwen2-vl-2b", "qwen2.5-vl-3b"])
def test_configs_are_the_public_ones(rd, name):
    cfg = rd.hf_config(name)
    t, v = cfg.text_config, cfg.vision_config
    assert cfg.image_token_id == 151655 and cfg.vision_start_token_id == 151652 and cfg.video_token_id == 151656
    assert t.vocab_size == 151936 and t.num_key_value_heads == 2 and cfg.tie_word_embeddings
    if name == "qwen2-vl-2b":
        assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size) == (1536, 28, 12, 8960)
        assert (v.depth, v.embed_dim, v.num_heads, v.mlp_ratio, v.hidden_size) == (32, 1280, 16, 4, 1536)
    else:
        assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size) == (2048, 36, 16, 11008)
        assert (v.depth, v.hidden_size, v.intermediate_size, v.out_hidden_size) == (32, 1280, 3420, 2048)
        assert v.fullatt_block_indexes == [7, 15, 23, 31] and v.window_size == 112
    small = rd.hf_config(name, text_layers=1, vision_depth=2)
    assert small.text_config.num_hidden_layers == 1 and small.vision_config.depth == 2
    assert small.text_config.hidden_size == t.hidden_size  # real widths


def _run(rd, tmp_path, *extra):
    import torch

    n = torch.get_num_threads()
    try:
        return rd.main(["--in-process", "--threads", "1", "--steps", "2", "--side12", "112", "--side3", "168",
                        "--work", str(tmp_path), "--json", str(tmp_path / "r.json"), *extra])
    finally:
        torch.set_num_threads(n)


def test_qwen2_vl_2b_paper_recipe_reduced_depth(rd, tmp_path):
    out = _run(rd, tmp_path, "--models", "qwen2-vl-2b", "--text-layers", "1", "--vision-depth", "1")
    assert (tmp_path / "r.json").is_file()
    res = out["models"]["qwen2-vl-2b"]
    assert out["failures"]["qwen2-vl-2b"] == [], out["failures"]
    assert res["base"]["text_layers"] == 1 and res["base"]["len_tokenizer"] == 151657
    s1, s2, s3 = (res["stages"][k] for k in "123")
    # DoRA on every LLM projection and the ViT's qkv, fc1, fc2 (one layer / one block), the MAE decoder in stage 1
    groups = s1["trainable"]
    assert groups["LLM attention (q,k,v,o_proj)"]["adapted_modules"] == 4
    assert groups["LLM MLP (gate,up,down_proj)"]["adapted_modules"] == 3
    assert {g: groups[g]["adapted_modules"] for g in groups if g.startswith("ViT")} == {
        "ViT attention (qkv)": 1, "ViT MLP (fc1)": 1, "ViT MLP (fc2)": 1}
    assert all(groups[g]["dora_magnitude"] > 0 for g in groups if g.startswith(("ViT", "LLM")))
    assert groups["stage-1 MAE decoder (full)"]["params"] > 40_000_000  # a full decoder layer at hidden 1536
    assert "stage-1 MAE decoder (full)" not in s2["trainable"]
    # real image-token counts: 112 px -> 4x4 merged units; 168 px -> 6x6; batches of one sample (micro 1)
    assert [sh["image_tokens"] for sh in s1["shapes"]["micro"]] == [[16], [16]]
    assert [sh["patches"] for sh in s1["shapes"]["micro"]] == [64, 64]
    assert [sh["image_tokens"] for sh in s3["shapes"]["query"]] == [[36], [36]]
    assert s3["gradcache_chunks"] == 6  # query, target, negative x 2 chunks of 1
    for s in (s1, s2, s3):
        assert s["finite"] and s["decreasing"] and len(s["losses"]) == 2 and len(s["step_s"]) == 2
        assert s["peak_rss_gib"] > 0
    r = res["reload"]
    assert r["hf_class"] == "Qwen2VLForConditionalGeneration" and r["adapter_tensors"] == 0 and r["params_match_base"]
    assert r["embed_dim"] == 1536 and r["text_shape"] == [3, 1536] and r["image_shape"] == [2, 1536] and r["finite"]
    assert r["eos_token_id"] == 151643 and r["mask_token_id"] == 151657 and r["spec_max_pixels"] == 168 * 168
    assert all(abs(x - 1) < 1e-2 for x in r["norms"])


def test_qwen25_vl_3b_paper_recipe_reduced_depth(rd, tmp_path):
    # stage 1 only: stages 2-3 are the 2B test's; this one checks what differs in Qwen2.5-VL (the gated ViT MLP's
    # adapters, the decoder at hidden 2048, the reload class)
    out = _run(rd, tmp_path, "--models", "qwen2.5-vl-3b", "--text-layers", "1", "--vision-depth", "2",
               "--stages", "1")
    assert out["failures"]["qwen2.5-vl-3b"] == [], out["failures"]
    res = out["models"]["qwen2.5-vl-3b"]
    groups = res["stages"]["1"]["trainable"]
    # Qwen2.5-VL's ViT MLP is gated (gate/up/down_proj): the default targets adapt it, fc1/fc2 match nothing
    vit = {g: v["adapted_modules"] for g, v in groups.items() if g.startswith("ViT")}
    assert vit == {"ViT attention (qkv)": 2, "ViT MLP (down_proj)": 2, "ViT MLP (gate_proj)": 2, "ViT MLP (up_proj)": 2}
    assert groups["stage-1 MAE decoder (full)"]["params"] > 70_000_000  # a decoder layer at hidden 2048
    assert res["reload"]["hf_class"] == "Qwen2_5_VLForConditionalGeneration"
    assert res["reload"]["embed_dim"] == 2048 and res["reload"]["mask_token_id"] == 151665


def test_dora_lora_weight_is_computed_directly_and_matches_peft(one_thread):
    """cocoa replaces peft's ``lora_B(lora_A(eye(in_features)))`` (an in x in identity per adapted linear per training
    forward; 8960^2 for Qwen2-VL-2B's down_proj) by ``B @ A``: the same DoRA outputs and gradients."""
    import copy

    import torch

    from cocoa.train.config import LoraSection
    from cocoa.train.lora import apply_adapters

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.down_proj = torch.nn.Linear(96, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down_proj(x)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = Block()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mlp(x)

    torch.manual_seed(0)
    net = Net()
    ref = copy.deepcopy(net)
    apply_adapters(net, LoraSection(method="dora", dropout=0.0, target_modules=["down_proj"]))
    from peft import LoraConfig, get_peft_model

    get_peft_model(ref, LoraConfig(r=8, lora_alpha=64, lora_dropout=0.0, target_modules=["down_proj"], use_dora=True))
    dora = [m for m in net.modules() if type(m).__name__ == "DoraLinearLayer"]
    assert dora and all("get_lora_weight" in vars(m) for m in dora)  # the direct product is installed
    for (n1, p1), (n2, p2) in zip(net.named_parameters(), ref.named_parameters()):
        assert n1 == n2
        with torch.no_grad():
            if "lora_B" in n1:  # non-zero B so the adapter matters
                p1.copy_(torch.randn_like(p1) * 0.1)
            p2.copy_(p1)
    net.train(), ref.train()
    x = torch.randn(5, 96)
    y1, y2 = net(x), ref(x)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    y1.square().sum().backward()
    y2.square().sum().backward()
    for (n1, p1), (_, p2) in zip(net.named_parameters(), ref.named_parameters()):
        if p1.grad is not None:
            torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-5, msg=n1)
