"""Training-step benchmark: a few steps of each CoCoA stage on a random-init Qwen2-VL-2B-sized model.

Runs the training loop's own code (``CocoaModel.stage1_loss`` / ``stage2_loss``, the loop's GradCache
stage-3 step, AdamW, gradient clipping, bf16 autocast) on synthetic batches built by the real collators
(noise images, scene-vocabulary text), and prints per stage: step time, tokens/s, MFU against a bf16
matmul peak measured in the same run, peak memory and the padding share.

Targets on an H100 (printed as PASS/MISS): stage-3 MFU >= 40 %; the stage-2 step <= 1.15x the stage-3 step
at equal tokens (time per token). ``--size tiny --device cpu`` runs the same code path in seconds (tests).

    python bench/train_bench.py                      # GPU: Qwen2-VL-2B-sized, 448 px images
    python bench/train_bench.py --size tiny --device cpu --steps 1 --warmup 0

Importable without polars / datasets (the GPU image lacks them).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES: dict[str, dict[str, Any]] = {
    # Qwen2-VL-2B: LLM hidden 1536, 28 layers, 12 heads / 2 KV heads, MLP 8960, vocab 151936;
    # ViT depth 32, width 1280, 16 heads, mlp ratio 4, patch 14, 2x2 merge.
    "2b": {"text": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                        num_key_value_heads=2, vocab_size=151936, rope_theta=1e6),
           "vision": dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4),
           "batch": 16, "image": 448, "query_words": 24, "text_words": 48},
    "tiny": {"text": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=None, rope_theta=10000.0),
             "vision": dict(depth=1, embed_dim=64, num_heads=4, mlp_ratio=2),
             "batch": 4, "image": 56, "query_words": 4, "text_words": 8},
}


# ---------------------------------------------------------------------------------------------------
# model and data
# ---------------------------------------------------------------------------------------------------
def build_model(size: str, device: Any, dtype: Any, image: int, attn: str = "sdpa") -> Any:
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from cocoa.model.wrapper import CocoaModel
    from cocoa.model.spec import EmbeddingSpec
    from cocoa.tiny.build import MERGE_SIZE, PATCH_SIZE, SPECIAL_TOKENS, TEMPORAL_PATCH_SIZE, _mrope_section, \
        build_processor, build_tokenizer

    tok = build_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    s = SIZES[size]
    t = dict(s["text"])
    vocab = t.pop("vocab_size") or len(tok)
    theta = t.pop("rope_theta")
    head_dim = t["hidden_size"] // t["num_attention_heads"]
    text = dict(t, vocab_size=vocab, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": _mrope_section(head_dim)},
                eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None, use_cache=False)
    vision = dict(s["vision"], hidden_size=t["hidden_size"], patch_size=PATCH_SIZE, spatial_merge_size=MERGE_SIZE,
                  temporal_patch_size=TEMPORAL_PATCH_SIZE, in_channels=3)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        hf = Qwen2VLForConditionalGeneration._from_config(cfg, dtype=dtype, attn_implementation=attn)
    px = image * image
    proc = build_processor(tok, min_pixels=px, max_pixels=px)
    spec = EmbeddingSpec(eos_token_id=ids["<|endoftext|>"], mask_token_id=ids["<|mask|>"], image_min_pixels=px,
                         image_max_pixels=px, max_length=4096)
    return CocoaModel(hf, proc, spec)


def _words(rng: random.Random, n: int) -> str:
    from cocoa.tiny.tokenizer import COLORS, FUNCTION_WORDS, RELATIONS, SHAPES

    pool = COLORS + SHAPES + RELATIONS + FUNCTION_WORDS
    return " ".join(rng.choice(pool) for _ in range(n))


def _noise_image(rng: random.Random, side: int) -> Any:
    from PIL import Image

    from cocoa.records import ImageRef

    data = bytes(rng.getrandbits(8) for _ in range(side * side * 3))
    return ImageRef.from_pil(Image.frombytes("RGB", (side, side), data))


def synthetic_batches(model: Any, stage: int, batch: int, image: int, qwords: int, twords: int, chunk: int,
                      seed: int = 0) -> Any:
    """Collated inputs for one step of ``stage`` (stage 3: query/target chunk lists)."""
    from cocoa.records import MixRecord
    from cocoa.model.collate import EmbedCollator, Stage1Collator, Stage2Collator

    rng = random.Random(seed)
    imgs = [_noise_image(rng, image) for _ in range(min(batch, 4))]
    spread = lambda n: max(1, int(n * rng.uniform(0.7, 1.3)))  # noqa: E731 - a realistic length spread
    if stage in (1, 2):
        recs = [MixRecord(origin="original", origin_id=f"b{i}", stages=[1, 2], image=imgs[i % len(imgs)],
                          prompt=_words(rng, spread(qwords)), text=_words(rng, spread(twords))) for i in range(batch)]
        if stage == 1:
            return Stage1Collator(model.processor, model.spec, max_length=4096, seed=seed)(recs)
        return Stage2Collator(model.processor, model.spec, max_length=4096, seed=seed)(recs)
    col = EmbedCollator(model.processor, model.spec, max_length=4096)
    q = [(_words(rng, spread(qwords)), imgs[i % len(imgs)]) for i in range(batch)]
    t = [(_words(rng, spread(twords)), None) for _ in range(batch)]
    return [[col(q[s:s + chunk]) for s in range(0, batch, chunk)], [col(t[s:s + chunk]) for s in range(0, batch, chunk)]]


# ---------------------------------------------------------------------------------------------------
# FLOPs, peak
# ---------------------------------------------------------------------------------------------------
def measured_peak_flops(device: Any, dtype: Any) -> float:
    """Dense matmul throughput (FLOP/s) measured here: bf16 8192^2 on CUDA, fp32 512^2 on CPU."""
    import torch

    n, iters = (8192, 20) if device.type == "cuda" else (512, 10)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _params(m: Any, skip: tuple[str, ...] = ()) -> int:
    return sum(p.numel() for n, p in m.named_parameters() if not any(s in n for s in skip))


def batch_flops(model: Any, b: dict[str, Any], stage: int) -> tuple[float, int, int]:
    """(model FLOPs of one fwd+bwd over batch ``b``, real tokens, padded slots): 6 N per token/patch plus
    attention (12 L^2 d per layer per sequence) for the LLM and the ViT, the LM head at masked positions."""
    cfg = model.hf_config
    tc, vc = cfg.text_config, cfg.vision_config
    lm = model.inner.language_model
    n_llm = _params(lm, skip=("embed_tokens",))
    mask = b["attention_mask"]
    real, slots = int(mask.sum()), mask.numel()
    B, L = mask.shape
    f = 6 * n_llm * real + 12 * tc.num_hidden_layers * tc.hidden_size * L * L * B
    if b.get("pixel_values") is not None:
        vis = model.inner.visual
        patches = b["pixel_values"].shape[0]
        f += 6 * _params(vis) * patches
        for tt, h, w in b["image_grid_thw"].tolist():
            p = tt * h * w
            f += 12 * vc.depth * vc.embed_dim * p * p
    if "labels" in b:
        n_masked = int((b["labels"] != -100).sum())
        f += 6 * tc.hidden_size * tc.vocab_size * n_masked
    if stage == 1 and model.image_decoder is not None:
        f += 6 * _params(model.image_decoder.layer) * real
        if b.get("image_unit_mask") is not None:
            f += 6 * _params(model.image_decoder.head) * int(b["image_unit_mask"].sum())
    return float(f), real, slots


# ---------------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------------
def bench_stage(model: Any, stage: int, data: Any, steps: int, warmup: int, device: Any, amp: Any,
                grad_ckpt: bool) -> dict[str, Any]:
    import torch

    from cocoa.model.collate import batch_to
    from cocoa.train.config import TrainConfig
    from cocoa.train.distributed import DistInfo
    from cocoa.train.method import as_loss as _as_loss, stage3_step as _stage3_step

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, foreach=True)
    info = DistInfo(device=device)
    cfg = TrainConfig.build({"stage3": {"temperature": 0.02, "grad_cache": True}})
    if stage == 3:
        groups = [[batch_to(b, device) for b in g] for g in data]
        flat = [b for g in groups for b in g]
    else:
        flat = [batch_to(data, device)]
    flops = reals = slots = 0
    for b in flat:
        f, r, s = batch_flops(model, b, stage)
        flops, reals, slots = flops + f, reals + r, slots + s

    def call(method: str, *a: Any, **kw: Any) -> Any:
        return getattr(model, method)(*a, **kw)

    def step() -> float:
        if stage == 3:
            loss, _, _, _ = _stage3_step(call, model, groups, cfg, info, amp)
        else:
            with amp:
                out = model.stage1_loss(flat[0]) if stage == 1 else model.stage2_loss(flat[0])
            loss_t, _ = _as_loss(out)
            loss_t.backward()
            loss = float(loss_t.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    dt = (time.perf_counter() - t) / max(steps, 1)
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del opt
    return {"stage": stage, "step_s": dt, "tokens": reals, "tokens_per_s": reals / dt, "flops": flops,
            "padding_share": 1 - reals / slots if slots else 0.0, "peak_mem_gib": peak_mem, "loss": loss}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="2b")
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    ap.add_argument("--stages", default="1,2,3")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per stage")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per stage")
    ap.add_argument("--batch", type=int, default=None, help="samples per step (default per size)")
    ap.add_argument("--chunk", type=int, default=None, help="stage-3 GradCache chunk (default: batch, one chunk)")
    ap.add_argument("--image", type=int, default=None, help="image side in pixels (default per size)")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--no-grad-ckpt", action="store_true", help="disable gradient checkpointing")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)

    import torch

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    s = SIZES[a.size]
    batch, image = a.batch or s["batch"], a.image or s["image"]
    chunk = a.chunk or batch
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    peak = measured_peak_flops(device, dtype)
    t0 = time.time()
    model = build_model(a.size, device, dtype, image, a.attn)
    grad_ckpt = not a.no_grad_ckpt and device.type == "cuda"
    if grad_ckpt:
        model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    stages = [int(x) for x in a.stages.split(",")]
    results = []
    for k in stages:
        if k == 1:
            model.ensure_image_decoder()
        data = synthetic_batches(model, k, batch, image, s["query_words"], s["text_words"], chunk, seed=k)
        r = bench_stage(model, k, data, a.steps, a.warmup, device, amp, grad_ckpt)
        r["mfu"] = r["flops"] / r["step_s"] / peak
        results.append(r)
    by = {r["stage"]: r for r in results}
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "size": a.size, "batch": batch, "chunk": chunk, "image": image, "grad_ckpt": grad_ckpt,
        "peak_tflops": peak / 1e12, "params_m": sum(p.numel() for p in model.model.parameters()) / 1e6,
        "stages": results, "seconds": time.time() - t0,
    }
    if 2 in by and 3 in by:
        out["stage2_vs_stage3_per_token"] = (by[2]["step_s"] / by[2]["tokens"]) / (by[3]["step_s"] / by[3]["tokens"])
    _report(out)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return out


def _report(out: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title=f"cocoa train bench: {out['size']} ({out['params_m']:.0f} M params) on {out['device']}, "
                    f"batch {out['batch']}, {out['image']} px, peak {out['peak_tflops'] * 1e3:.0f} GFLOP/s measured")
    for c in ("stage", "step ms", "tokens", "tokens/s", "MFU", "peak GiB", "padding", "loss"):
        t.add_column(c, justify="right")
    for r in out["stages"]:
        t.add_row(str(r["stage"]), f"{r['step_s'] * 1e3:.1f}", str(r["tokens"]), f"{r['tokens_per_s']:.0f}",
                  f"{r['mfu']:.1%}", "-" if math.isnan(r["peak_mem_gib"]) else f"{r['peak_mem_gib']:.1f}",
                  f"{r['padding_share']:.1%}", f"{r['loss']:.3f}")
    con.print(t)
    by = {r["stage"]: r for r in out["stages"]}
    if 3 in by:
        ok = by[3]["mfu"] >= 0.40
        con.print(f"target stage-3 MFU >= 40%: {by[3]['mfu']:.1%} -> {'PASS' if ok else 'MISS'}")
    if "stage2_vs_stage3_per_token" in out:
        x = out["stage2_vs_stage3_per_token"]
        con.print(f"target stage-2 step <= 1.15x stage-3 step at equal tokens: {x:.2f}x -> "
                  f"{'PASS' if x <= 1.15 else 'MISS'}")
    if out["device"] == "cpu":
        con.print("(CPU run: a code-path check; the targets are for an H100)")


if __name__ == "__main__":
    main()
