"""Attention bench for CoCoA's masks: dense-mask SDPA vs FlexAttention, and full stage-1/2/3 steps.

Prints, for each configuration, ms per step, the ratio to a causal step measured in the same run, and
peak memory. Two parts:

1. attention alone (fwd+bwd): causal SDPA (``is_causal``) vs the stage-2 collaborative mask as a dense
   boolean SDPA mask vs a FlexAttention ``BlockMask``;
2. full training steps of ``CocoaModel`` (AdamW, full fine-tuning) on a random-init Qwen2-VL: a causal
   step on the stage-2 sequence (the generative baseline), stage 1 (bidirectional MNTP + MAE), stage 2
   (collaborative mask, dense SDPA and FlexAttention), stage 3 (bidirectional InfoNCE on EOS).

Batches go through the real collators and processor (synthetic images and texts; the tokenizer is the
offline tiny one, whose ids fit any vocabulary).

    # CPU, tiny config (same code path; used by the tests)
    python bench/attention_bench.py --size tiny
    # H100: Qwen2-VL-2B-sized random-init model, 448 px images, B=16; < 4 min
    python bench/attention_bench.py --size 2b --device cuda

Target (issue 6): the stage-2 step with its collaborative mask within 1.15x of the causal step.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES: dict[str, dict[str, Any]] = {
    # text: hidden, layers, heads, kv heads, mlp; vision: embed, depth, heads; image side (px); batch
    "tiny": dict(hidden=64, layers=2, heads=4, kv=2, mlp=128, v_embed=32, v_depth=1, v_heads=2, image=56,
                 batch=4, query_words=6, target_words=10, attn_lengths=[64, 128], attn_batch=2),
    "2b": dict(hidden=1536, layers=28, heads=12, kv=2, mlp=8960, v_embed=1280, v_depth=32, v_heads=16, image=448,
               batch=16, query_words=40, target_words=80, attn_lengths=[1024, 2048, 4096], attn_batch=8),
}
VOCAB_2B = 151936


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process max RSS (GB), CPU only
    except Exception:  # pragma: no cover
        return float("nan")


def timeit(fn: Callable[[], Any], device: torch.device, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000.0


# ---------------------------------------------------------------------------------------------------
# part 1: attention alone
# ---------------------------------------------------------------------------------------------------
def attention_bench(size: dict[str, Any], device: torch.device, dtype: torch.dtype, steps: int, warmup: int) -> list[dict]:
    import torch.nn.functional as F

    from cocoa.model.masks import Layout, block_mask, collaborative_mask
    from cocoa.model.flex import _flex_fn

    H, KV = size["heads"], size["kv"]
    D = size["hidden"] // H
    B = size["attn_batch"]
    rows = []
    flex = _flex_fn(device.type)
    backward = device.type == "cuda"  # FlexAttention has no CPU backward: on CPU all three run forward only
    for L in size["attn_lengths"]:
        # stage-2 shape: A = 60 %, EOS, B = the rest
        a = int(L * 0.6)
        lay = Layout.from_lengths([a] * B, [L - a - 1] * B, length=L).to(device)
        q = torch.randn(B, H, L, D, device=device, dtype=dtype, requires_grad=backward)
        k = torch.randn(B, KV, L, D, device=device, dtype=dtype, requires_grad=backward)
        v = torch.randn(B, KV, L, D, device=device, dtype=dtype, requires_grad=backward)
        dense = collaborative_mask(lay)
        bm = block_mask("collaborative", lay, block_size=128 if L >= 128 else 16)

        def run(kind: str) -> None:
            if kind == "causal":
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            elif kind == "dense":
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)
            else:
                o = flex(q, k, v, block_mask=bm, enable_gqa=True)
            if backward:
                o.float().sum().backward()

        res = {"L": L, "mode": "fwd+bwd" if backward else "fwd"}
        for kind in ("causal", "dense", "flex"):
            reset_peak(device)
            res[kind] = timeit(lambda: run(kind), device, steps, warmup)
            res[kind + "_gb"] = peak_gb(device)
        # accuracy of flex vs fp32 dense
        with torch.no_grad():
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=dense, enable_gqa=True)
            got = flex(q, k, v, block_mask=bm, enable_gqa=True).float()
            res["flex_rel_err"] = ((got - ref).norm() / ref.norm()).item()
        rows.append(res)
    return rows


# ---------------------------------------------------------------------------------------------------
# part 2: full steps
# ---------------------------------------------------------------------------------------------------
def build_model(size_name: str, size: dict[str, Any], device: torch.device, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from cocoa.model.wrapper import CocoaModel
    from cocoa.model.spec import EmbeddingSpec
    from cocoa.tiny.build import SPECIAL_TOKENS, build_processor, build_tokenizer

    tok = build_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    side = size["image"]
    processor = build_processor(tok, min_pixels=56 * 56, max_pixels=side * side)
    head_dim = size["hidden"] // size["heads"]
    half = head_dim // 2
    t_sec = half // 4
    mrope = [t_sec, (half - t_sec) // 2, half - t_sec - (half - t_sec) // 2]
    vocab = VOCAB_2B if size_name == "2b" else len(tok)
    text = dict(
        vocab_size=vocab, hidden_size=size["hidden"], intermediate_size=size["mlp"],
        num_hidden_layers=size["layers"], num_attention_heads=size["heads"], num_key_value_heads=size["kv"],
        max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
        eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None,
        tie_word_embeddings=True, rms_norm_eps=1e-6,
    )
    vision = dict(depth=size["v_depth"], embed_dim=size["v_embed"], num_heads=size["v_heads"], mlp_ratio=4,
                  hidden_size=size["hidden"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    cfg = Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration(cfg).to(dtype)
    spec = EmbeddingSpec(eos_token="<|endoftext|>", eos_token_id=ids["<|endoftext|>"], mask_token_id=ids["<|mask|>"],
                         max_length=4096)
    return CocoaModel(model, processor, spec), processor, spec


WORDS = ("red green blue yellow circle square triangle star left right above below the a of and small large "
         "metal rubber cube sphere cylinder two three").split()


def make_batches(size: dict[str, Any], processor: Any, spec: Any, device: torch.device) -> dict[str, dict]:
    import random

    from PIL import Image

    from cocoa.records import ImageRef, MixRecord
    from cocoa.model.collate import EmbedCollator, Stage1Collator, Stage2Collator, batch_to

    rng = random.Random(0)
    side = size["image"]

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    def image() -> Image.Image:
        im = Image.new("RGB", (side, side), tuple(rng.randrange(256) for _ in range(3)))
        for _ in range(4):
            x, y = rng.randrange(side // 2), rng.randrange(side // 2)
            im.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + side // 4, y + side // 4))
        return im

    B = size["batch"]
    recs = [
        MixRecord(origin="original", origin_id=str(i), stages=[1, 2], image=ImageRef.from_pil(image()),
                  prompt=words(size["query_words"]), text=words(size["target_words"]))
        for i in range(B)
    ]
    s1 = Stage1Collator(processor, spec, max_length=spec.max_length)(recs)
    s2 = Stage2Collator(processor, spec, max_length=spec.max_length)(recs)
    emb = EmbedCollator(processor, spec, max_length=spec.max_length)
    q = emb([(r.prompt, r.image.load()) for r in recs])  # type: ignore[union-attr]
    t = emb([(r.text, None) for r in recs])
    return {k: batch_to(v, device) for k, v in {"s1": s1, "s2": s2, "q": q, "t": t}.items()}


def step_bench(size_name: str, size: dict[str, Any], device: torch.device, dtype: torch.dtype, steps: int, warmup: int,
               grad_ckpt: bool) -> list[dict]:
    from cocoa.model.objectives import mntp_loss

    m, processor, spec = build_model(size_name, size, device, dtype)
    m.ensure_image_decoder()
    if grad_ckpt:
        m.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m.train()
    batches = make_batches(size, processor, spec, device)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5, foreach=True)

    def step(loss_fn: Callable[[], torch.Tensor]) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    s1, s2, q, t = batches["s1"], batches["s2"], batches["q"], batches["t"]
    configs: list[tuple[str, str, Callable[[], torch.Tensor]]] = [
        ("causal (stage-2 sequence)", "sdpa", lambda: mntp_loss(m.forward_hidden(s2, "causal"), s2["labels"], m.lm_head)),
        ("stage 1 bidirectional MNTP+MAE", "sdpa", lambda: m.stage1_loss(s1)[0]),
        ("stage 2 collaborative, dense SDPA", "sdpa", lambda: m.stage2_loss(s2)[0]),
        ("stage 2 collaborative, FlexAttention", "cocoa_flex", lambda: m.stage2_loss(s2)[0]),
        ("stage 3 bidirectional InfoNCE", "sdpa", lambda: m.stage3_loss(q, t, gather=False)[0]),
    ]
    rows = []
    for name, impl, fn in configs:
        if impl == "cocoa_flex" and device.type != "cuda":
            rows.append({"name": name, "ms": math.nan, "gb": math.nan,
                         "error": "skipped: FlexAttention has no CPU backward (CUDA only)"})
            continue
        m.set_attention(impl)
        reset_peak(device)
        try:
            ms = timeit(lambda: step(fn), device, steps, warmup)
            rows.append({"name": name, "ms": ms, "gb": peak_gb(device)})
        except Exception as e:  # report, keep going (e.g. flex unavailable on this build)
            rows.append({"name": name, "ms": math.nan, "gb": math.nan, "error": f"{type(e).__name__}: {e}"[:200]})
    m.set_attention("sdpa")
    rows.append({"name": "_shape", "L_s1": tuple(s1["input_ids"].shape), "L_s2": tuple(s2["input_ids"].shape),
                 "L_q": tuple(q["input_ids"].shape), "L_t": tuple(t["input_ids"].shape)})
    return rows


def report(attn: list[dict], steps_rows: list[dict], out: Any = None) -> None:
    p = lambda s="": print(s, file=out or sys.stdout)  # noqa: E731
    if attn:
        p(f"attention alone ({attn[0]['mode']}, median ms; ratio vs causal SDPA)")
        p(f"{'L':>6} {'causal':>9} {'dense':>9} {'ratio':>6} {'flex':>9} {'ratio':>6} {'flex rel err':>12}")
        for r in attn:
            p(f"{r['L']:>6} {r['causal']:>9.2f} {r['dense']:>9.2f} {r['dense'] / r['causal']:>6.2f} "
              f"{r['flex']:>9.2f} {r['flex'] / r['causal']:>6.2f} {r['flex_rel_err']:>12.2e}")
    if steps_rows:
        shape = next((r for r in steps_rows if r["name"] == "_shape"), None)
        rows = [r for r in steps_rows if r["name"] != "_shape"]
        base = rows[0]["ms"]
        p("full training steps (median ms/step; ratio vs the causal step; peak memory GB)")
        if shape:
            p(f"  batch shapes: stage1 {shape['L_s1']}, stage2 {shape['L_s2']}, stage3 q {shape['L_q']} t {shape['L_t']}")
        for r in rows:
            extra = f"  [{r['error']}]" if "error" in r else ""
            p(f"  {r['name']:<40} {r['ms']:>9.1f} ms {r['ms'] / base:>6.3f}x {r['gb']:>7.2f} GB{extra}")
        s2 = next(r for r in rows if r["name"].startswith("stage 2 collaborative, dense"))
        ratio = s2["ms"] / base
        verdict = "PASS" if ratio <= 1.15 else "FAIL"
        p(f"target: stage-2 (dense collaborative) step within 1.15x of the causal step: {ratio:.3f}x {verdict}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="model/sequence size (default: 2b on CUDA, tiny on CPU)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 5 CUDA, 2 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default 2 CUDA, 1 CPU)")
    ap.add_argument("--batch", type=int, default=None, help="samples per step (default per size)")
    ap.add_argument("--no-grad-ckpt", action="store_true", help="disable gradient checkpointing (on by default on CUDA)")
    ap.add_argument("--skip-attention", action="store_true", help="skip part 1 (attention alone)")
    ap.add_argument("--skip-steps", action="store_true", help="skip part 2 (full steps)")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size_name = args.size or ("2b" if device.type == "cuda" else "tiny")
    size = dict(SIZES[size_name])
    if args.batch:
        size["batch"] = args.batch
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    steps = args.steps or (5 if device.type == "cuda" else 2)
    warmup = args.warmup if args.warmup is not None else (2 if device.type == "cuda" else 1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    import transformers

    print(f"cocoa attention bench: size={size_name} device={name} dtype={dtype} torch {torch.__version__} "
          f"transformers {transformers.__version__}")
    t0 = time.time()
    attn = [] if args.skip_attention else attention_bench(size, device, dtype, steps, warmup)
    rows = [] if args.skip_steps else step_bench(size_name, size, device, dtype, steps, warmup,
                                                 grad_ckpt=device.type == "cuda" and not args.no_grad_ckpt)
    report(attn, rows)
    print(f"total {time.time() - t0:.1f} s")
    return {"attention": attn, "steps": rows}


if __name__ == "__main__":
    main()
