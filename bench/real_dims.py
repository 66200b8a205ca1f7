"""The paper's recipe at the real dimensions of Qwen2-VL-2B and Qwen2.5-VL-3B (random init), on CPU.

No weights can be downloaded here, so each model is built from its public ``config.json`` values (written
below, no hub) with random weights, beside a local tokenizer whose special-token ids are the ones the config
points at (``<|endoftext|>`` 151643, ``<|im_end|>`` 151645, ``<|vision_start|>`` 151652, ``<|image_pad|>``
151655, ...; cocoa adds ``<|mask|>`` at load, as it does for the hub checkpoints). The model directory looks
like a hub snapshot: no ``cocoa.json``.

Then ``cocoa-train --preset paper`` runs through :func:`cocoa.train.run.run_training` -- preflight, memory-mapped
shards, DoRA r 8 / alpha 64 on the LLM projections and the ViT's qkv/fc1/fc2 (gate/up/down for Qwen2.5-VL's
gated ViT MLP), stage 1's MAE decoder, the collaborative mask, GradCache, checkpoints, adapter merging and the
saved stage models -- for a few optimizer steps per stage, on 448 px images for stages 1-2 and the evaluation
pixel budget (672 px) for stage 3, with micro-batches of 1. Each stage's data is exactly one global batch and
the bench pins the per-step mask seed, so every step sees the same batch with the same masks: the loss sequence
is a learning signal. Afterwards the stage-3 model is reloaded with plain transformers and embeds a few inputs
through ``cocoa.Embedder``.

Printed per stage: trainable parameters by module group, image tokens per sample, sequence lengths, seconds
per step, peak RSS (and peak GPU memory on CUDA), and whether the losses are finite and decrease.

    python bench/real_dims.py                        # full depth, 3 steps per stage: minutes on a GPU (gpu_check.sh);
                                                     # on 2 CPU cores one stage-3 step of the 2B alone takes ~40 min
    python bench/real_dims.py --text-layers 2 --vision-depth 2 --full-depth 1 --threads 1 --json real_dims.json
        # the CPU run of docs/benchmarks.md: the whole recipe at real widths and image sizes with 2 LLM layers and 2
        # ViT blocks, then stage 1 at FULL depth (one step of one 448 px sample) with merge, reload and Embedder
    python bench/real_dims.py --text-layers 1 --vision-depth 1 --side12 112 --side3 168 --steps 2   # the test's size

``--precision bf16`` (default): bf16 base weights, fp32 adapters / MAE decoder, bf16 autocast -- the CUDA
recipe's precision, also ~3x faster than fp32 on an AVX512-BF16 CPU; ``--precision fp32`` for fp32 throughout.
Gradient checkpointing is on, as in the documented paper ``train.yaml``. Each model (and phase) runs in its own
child process, so its peak RSS is its own. Importable without polars / datasets / vllm.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# ---------------------------------------------------------------------------------------------------
# the public configs (config.json of the hub checkpoints), written out
# ---------------------------------------------------------------------------------------------------
VOCAB_SIZE = 151936  # embedding rows (padded); the tokenizer has fewer tokens
BPE_SIZE = 151643  # ids 0..151642 are byte-level BPE tokens, the special tokens follow
QWEN2_SPECIALS = (  # ids 151643 .. 151656, Qwen2-VL's order
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)
QWEN25_EXTRA = (  # 151657 .. 151664 (Qwen2.5 adds tool-call and fill-in-the-middle tokens; not special)
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)
TOKEN_IDS = {  # what the configs point at
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656,
}
MIN_PIXELS, MAX_PIXELS = 3136, 12845056  # the hub processors' preprocessor_config.json

MODELS: dict[str, dict[str, Any]] = {
    "qwen2-vl-2b": {
        "arch": "qwen2-vl", "hub": "Qwen/Qwen2-VL-2B-Instruct",
        "text": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                     num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
                     sliding_window=32768, max_window_layers=28, use_sliding_window=False, attention_dropout=0.0,
                     initializer_range=0.02, rope_theta=1e6, mrope_section=[16, 24, 24]),
        "vision": dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, in_channels=3, hidden_size=1536,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu"),
    },
    "qwen2.5-vl-3b": {
        "arch": "qwen2.5-vl", "hub": "Qwen/Qwen2.5-VL-3B-Instruct",
        "text": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                     num_key_value_heads=2, hidden_act="silu", max_position_embeddings=128000, rms_norm_eps=1e-6,
                     sliding_window=32768, max_window_layers=70, use_sliding_window=False, attention_dropout=0.0,
                     initializer_range=0.02, rope_theta=1e6, mrope_section=[16, 24, 24]),
        "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3,
                       out_hidden_size=2048, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                       window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2,
                       hidden_act="silu"),
    },
}

# ``--toy``: the same code path at toy widths (bench/gpu_check.sh --cpu); the tokenizer, token ids and the
# embedding rows stay real
TOY = {
    "qwen2-vl-2b": {"text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_window_layers=2, mrope_section=[2, 3, 3]),
                    "vision": dict(depth=2, embed_dim=32, mlp_ratio=2, num_heads=2, hidden_size=64)},
    "qwen2.5-vl-3b": {"text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_window_layers=2, mrope_section=[2, 3, 3]),
                      "vision": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                     fullatt_block_indexes=[1])},
}

STAGE12_SIDE = 448  # px: 32 x 32 patches -> 256 LLM tokens (the authors' stage-2 resolution)
STAGE3_SIDE = 672  # px: MMEB's evaluation budget, 48 x 48 patches -> 576 LLM tokens


# ---------------------------------------------------------------------------------------------------
# tokenizer, config, model directory
# ---------------------------------------------------------------------------------------------------
def specials(arch: str) -> tuple[str, ...]:
    return QWEN2_SPECIALS + (QWEN25_EXTRA if arch == "qwen2.5-vl" else ())


def qwen_tokenizer(arch: str = "qwen2-vl") -> Any:
    """A Qwen2 tokenizer with the hub's special-token ids: the tiny model's byte-level BPE (cocoa.tiny) renumbered
    from 0, padded with unreachable filler entries up to id 151642, then Qwen's added tokens from 151643 on.
    ``eos_token`` ``<|im_end|>`` and ``pad_token`` ``<|endoftext|>`` as in the Instruct checkpoints."""
    from transformers import AddedToken, Qwen2TokenizerFast

    from cocoa.tiny.tokenizer import CHAT_TEMPLATE, DEFAULT_VOCAB_SIZE, SPECIAL_TOKENS as TINY_SPECIALS, _train_bpe

    items, merges = _train_bpe(DEFAULT_VOCAB_SIZE)
    words = [t for t, _ in sorted(items, key=lambda kv: kv[1]) if t not in TINY_SPECIALS]
    vocab = {t: i for i, t in enumerate(words)}
    for i in range(len(vocab), BPE_SIZE):  # never produced: no merge builds them
        vocab[f"<|cocoa_unused_{i}|>"] = i
    tok = Qwen2TokenizerFast(vocab=vocab, merges=list(merges), unk_token=None, bos_token=None, eos_token=None,
                             pad_token=None, add_prefix_space=False, clean_up_tokenization_spaces=False,
                             model_max_length=32768)
    names = specials(arch)
    tok.add_tokens([AddedToken(t, special=t in QWEN2_SPECIALS, normalized=False) for t in names],
                   special_tokens=True)
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    for i, t in enumerate(names):
        got = tok.convert_tokens_to_ids(t)
        if got != BPE_SIZE + i:
            raise RuntimeError(f"real-dims tokenizer: {t} got id {got}, expected {BPE_SIZE + i}")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def hf_config(name: str, *, text_layers: int | None = None, vision_depth: int | None = None, toy: bool = False) -> Any:
    """The model's HF config from :data:`MODELS` (optionally fewer LLM layers / ViT blocks at the real widths, or
    the toy widths of :data:`TOY`)."""
    m = MODELS[name]
    text = dict(m["text"], **(TOY[name]["text"] if toy else {}))
    vision = dict(m["vision"], **(TOY[name]["vision"] if toy else {}))
    theta, section = text.pop("rope_theta"), text.pop("mrope_section")
    text.update(vocab_size=VOCAB_SIZE, tie_word_embeddings=True, use_cache=True, bos_token_id=TOKEN_IDS["bos_token_id"],
                eos_token_id=TOKEN_IDS["eos_token_id"], pad_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": section})
    if text_layers:
        text["num_hidden_layers"] = text_layers
        text["max_window_layers"] = min(text["max_window_layers"], text_layers)
    if vision_depth:
        vision["depth"] = vision_depth
        if "fullatt_block_indexes" in vision:  # keep full-attention blocks among the windowed ones
            full = [i for i in vision["fullatt_block_indexes"] if i < vision_depth]
            vision["fullatt_block_indexes"] = full or [vision_depth - 1]
    ids = {k: v for k, v in TOKEN_IDS.items() if k not in ("bos_token_id", "eos_token_id")}
    if m["arch"] == "qwen2-vl":
        from transformers import Qwen2VLConfig as Cfg
    else:
        from transformers import Qwen2_5_VLConfig as Cfg
    return Cfg(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)


def model_class(arch: str) -> Any:
    if arch == "qwen2-vl":
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration


def build_model_dir(name: str, out: str | Path, *, dtype: str = "bf16", text_layers: int | None = None,
                    vision_depth: int | None = None, seed: int = 0, toy: bool = False,
                    device: str = "cpu") -> dict[str, Any]:
    """Write a random-init model at the real dimensions as a hub snapshot would look (config, weights,
    tokenizer, processor; no cocoa.json). Returns facts about it. ``device`` cuda initialises on the GPU."""
    import torch

    from cocoa.tiny.build import build_processor

    m = MODELS[name]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tok = qwen_tokenizer(m["arch"])
    cfg = hf_config(name, text_layers=text_layers, vision_depth=vision_depth, toy=toy)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        with torch.device(device):
            model = model_class(m["arch"])._from_config(cfg, dtype=torch_dtype)
    finally:
        torch.random.set_rng_state(state)
    model.generation_config.eos_token_id = [TOKEN_IDS["eos_token_id"], TOKEN_IDS["bos_token_id"]]
    model.generation_config.pad_token_id = TOKEN_IDS["bos_token_id"]
    model.generation_config.bos_token_id = TOKEN_IDS["bos_token_id"]
    n_params = sum(p.numel() for p in model.parameters())
    t_build = time.perf_counter() - t0
    model.save_pretrained(out)
    build_processor(tok, MIN_PIXELS, MAX_PIXELS, m["arch"]).save_pretrained(out)
    del model
    if device != "cpu":
        torch.cuda.empty_cache()
    return {"name": name, "hub": m["hub"], "dir": str(out), "params": n_params, "len_tokenizer": len(tok), "toy": toy,
            "text_layers": cfg.text_config.num_hidden_layers, "vision_depth": cfg.vision_config.depth,
            "dtype": dtype, "build_s": round(t_build, 1), "build_and_save_s": round(time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------------------------------------------
# data: one global batch per stage, real-size images
# ---------------------------------------------------------------------------------------------------
WORDS = ("red green blue yellow purple orange circle square triangle star cube sphere cylinder left right above "
         "below behind the a of and small large metal rubber shiny two three four near far next to on in").split()


def _image(rng: random.Random, side: int) -> Any:
    """A ``side`` x ``side`` RGB scene: a coloured background, a few rectangles, mild noise (real-size pixels)."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (side, side), tuple(rng.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(im)
    for _ in range(6):
        x, y = rng.randrange(side - side // 4), rng.randrange(side - side // 4)
        w, h = rng.randrange(side // 8, side // 3), rng.randrange(side // 8, side // 3)
        d.rectangle((x, y, x + w, y + h), fill=tuple(rng.randrange(256) for _ in range(3)))
    noise = Image.effect_noise((side, side), 24).convert("RGB")
    return Image.blend(im, noise, 0.15)


def make_workspace(root: str | Path, *, rows12: int, rows3: int, side12: int = STAGE12_SIDE,
                   side3: int = STAGE3_SIDE, seed: int = 0) -> Path:
    """``root/mix`` (MixRecords: image + prompt + text, stages 1-2) and ``root/original`` (PairRecords: image +
    query -> text, with a hard-negative text), texts of distinct lengths so the batch order is fixed."""
    from cocoa.records import ImageRef, MixRecord, PairRecord
    from cocoa.shards import write_records

    rng = random.Random(seed)
    words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    root = Path(root)
    mix = [MixRecord(origin="original", origin_id=f"r{i}", source="real-dims", stages=[1, 2],
                     image=ImageRef.from_pil(_image(rng, side12)), prompt=words(16 + 2 * i), text=words(40 + 6 * i))
           for i in range(rows12)]
    write_records(root / "mix", "MixRecord", mix, overwrite=True)
    pairs = [PairRecord(source="real-dims", qry_text=words(12 + 2 * i), qry_image=ImageRef.from_pil(_image(rng, side3)),
                        pos_text=words(20 + 3 * i), neg_text=words(20 + 3 * i + 1)) for i in range(rows3)]
    write_records(root / "original", "PairRecord", pairs, overwrite=True)
    return root


# ---------------------------------------------------------------------------------------------------
# observing the run (wraps cocoa.train.stage's functions; the training code itself is unchanged)
# ---------------------------------------------------------------------------------------------------
def _rss_gib(field: str = "VmRSS") -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class PeakRSS:
    """Peak resident memory of this process over a window: the kernel's high-water mark (``VmHWM``, reset
    through ``/proc/self/clear_refs``) where that works, else a 50 ms sampler."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.peak = _rss_gib()
        self._hwm = False
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._hwm = True
        except OSError:
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _rss_gib())

    def stop(self) -> float:
        if self._hwm:
            self.peak = max(self.peak, _rss_gib("VmHWM"))
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
        return self.peak


def _group(name: str) -> str:
    """Module group of a parameter name (PEFT-wrapped or plain)."""
    leaf_owner = name.split(".lora_")[0].split(".base_layer")[0]
    leaf = leaf_owner.rsplit(".", 2)[-2] if leaf_owner.endswith((".weight", ".bias")) else leaf_owner.rsplit(".", 1)[-1]
    if name.startswith("image_decoder") or ".image_decoder." in name:
        return "stage-1 MAE decoder (full)"
    if "visual" in name:
        if ".merger." in name:
            return "ViT merger"
        if leaf in ("qkv", "proj"):
            return f"ViT attention ({leaf})"
        return f"ViT MLP ({leaf})"
    if leaf in ("q_proj", "k_proj", "v_proj", "o_proj"):
        return "LLM attention (q,k,v,o_proj)"
    if leaf in ("gate_proj", "up_proj", "down_proj"):
        return "LLM MLP (gate,up,down_proj)"
    return f"other ({leaf})"


def trainable_groups(model: Any) -> dict[str, dict[str, int]]:
    """Per module group: trainable parameters, of which DoRA magnitudes, and adapted modules."""
    groups: dict[str, dict[str, int]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = groups.setdefault(_group(name), {"params": 0, "dora_magnitude": 0, "adapted_modules": 0})
        g["params"] += p.numel()
        if "lora_magnitude_vector" in name:
            g["dora_magnitude"] += p.numel()
        if ".lora_A." in name:
            g["adapted_modules"] += 1
    return dict(sorted(groups.items()))


def _batch_shape(b: dict[str, Any], image_token_id: int) -> dict[str, Any]:
    ids, mask = b["input_ids"], b["attention_mask"]
    return {"padded_length": int(ids.shape[1]), "lengths": [int(x) for x in mask.sum(1)],
            "image_tokens": [int(x) for x in ((ids == image_token_id) & mask.bool()).sum(1)],
            "patches": int(b["pixel_values"].shape[0]) if b.get("pixel_values") is not None else 0}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class Observer:
    """Wraps ``cocoa.train.stage``'s build / forward-backward / optimizer step / finish to record, per stage,
    the trainable groups, batch shapes, step times and peak RSS; pins ``cocoa.train.batches.step_seed`` to step
    0 so every step of a stage repeats the same masks (the data is one batch, so the same rows too)."""

    def __init__(self) -> None:
        self.stages: dict[int, dict[str, Any]] = {}
        self._saved: list[tuple[Any, str, Any]] = []
        self.rss = PeakRSS()

    def __enter__(self) -> "Observer":
        import cocoa.train.batches as B
        import cocoa.train.stage as S

        obs = self
        build, fb, opt, finish, seed = S.build, S._forward_backward, S._optimizer_step, S.finish, B.step_seed

        def w_build(sp: Any, *a: Any, **kw: Any) -> Any:
            rec = obs.stages.setdefault(sp.stage, {"shapes": {}, "step_s": [], "micro_s": []})
            obs.rss.start()
            if _cuda():
                import torch

                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            st = build(sp, *a, **kw)
            rec["build_s"] = round(time.perf_counter() - t, 1)
            rec["trainable"] = trainable_groups(st.model)
            rec["trainable_total"] = sum(g["params"] for g in rec["trainable"].values())
            rec["params_total"] = sum(p.numel() for p in st.model.parameters())
            rec["micro_batch_size"], rec["batch_size"], rec["steps"] = st.s.micro_batch_size, st.s.batch_size, st.total
            rec["t_step"] = time.perf_counter()
            return st

        def w_fb(st: Any, item: dict[str, Any], *a: Any, **kw: Any) -> Any:
            rec = obs.stages[st.k]
            tid = st.model.image_token_id
            if not rec["shapes"]:
                if st.k == 3:
                    names = ("query", "target", "negative")
                    rec["shapes"] = {names[i]: [_batch_shape(b, tid) for b in g] for i, g in enumerate(item["groups"])}
                    rec["gradcache_chunks"] = sum(len(g) for g in item["groups"])
                else:
                    rec["shapes"].setdefault("micro", [])
            if st.k != 3 and item.get("step") == 0 and item.get("batch") is not None:
                rec["shapes"]["micro"].append(_batch_shape(item["batch"], tid))
            t = time.perf_counter()
            out = fb(st, item, *a, **kw)
            rec["micro_s"].append(round(time.perf_counter() - t, 2))
            return out

        def w_opt(st: Any, *a: Any, **kw: Any) -> Any:
            rec = obs.stages[st.k]
            out = opt(st, *a, **kw)
            now = time.perf_counter()
            rec["step_s"].append(round(now - rec["t_step"], 2))  # data + forward/backward + optimizer + checkpoint
            rec["t_step"] = now
            return out

        def w_finish(st: Any, *a: Any, **kw: Any) -> Any:
            rec = obs.stages[st.k]
            t = time.perf_counter()
            out = finish(st, *a, **kw)
            rec["finish_s"] = round(time.perf_counter() - t, 1)  # merge adapters + save the stage model
            rec["peak_rss_gib"] = round(obs.rss.stop(), 2)
            if _cuda():
                import torch

                rec["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            return out

        def pinned_seed(seed_: int, k: int, step: int, rank: int, micro: int) -> int:
            return seed(seed_, k, 0, rank, micro)

        for mod, name, new in ((S, "build", w_build), (S, "_forward_backward", w_fb), (S, "_optimizer_step", w_opt),
                               (S, "finish", w_finish), (B, "step_seed", pinned_seed)):
            self._saved.append((mod, name, getattr(mod, name)))
            setattr(mod, name, new)
        return self

    def __exit__(self, *exc: Any) -> None:
        for mod, name, old in reversed(self._saved):
            setattr(mod, name, old)
        self._saved.clear()


# ---------------------------------------------------------------------------------------------------
# one model
# ---------------------------------------------------------------------------------------------------
def train_config(model_dir: Path, data: Path, out: Path, a: argparse.Namespace) -> Any:
    """``--preset paper`` with a few steps of one batch per stage and the real image budgets."""
    from cocoa.train.config import TrainConfig

    px12, px3 = a.side12 * a.side12, a.side3 * a.side3  # the paper preset's budgets at the default sides
    stage = lambda batch, micro, px: {"steps": a.steps, "batch_size": batch, "micro_batch_size": micro,  # noqa: E731
                                      "image_max_pixels": px, "save_every": 0}
    return TrainConfig.build({
        "model": str(model_dir), "data": str(data), "out": str(out), "stages": a.stages, "preset": "paper",
        "precision": a.precision, "progress": False, "overwrite": True,
        "gradient_checkpointing": not a.no_grad_ckpt,  # as the documented paper train.yaml
        "lora": {"dropout": a.lora_dropout},
        "stage1": stage(a.batch12, a.micro, px12), "stage2": stage(a.batch12, a.micro, px12),
        "stage3": stage(a.batch3, a.micro, px3),
    })


def _losses_ok(losses: list[float]) -> dict[str, Any]:
    finite = all(math.isfinite(x) for x in losses)
    return {"losses": losses, "finite": finite, "decreasing": finite and len(losses) > 1 and losses[-1] < losses[0],
            "monotone": finite and all(b < a for a, b in zip(losses, losses[1:]))}


def reload_and_embed(model_dir: Path, base: dict[str, Any], precision: str) -> dict[str, Any]:
    """Stage 3's model loads with plain transformers (a merged Qwen checkpoint, no adapter tensors) and embeds
    texts and images through ``cocoa.Embedder``."""
    import numpy as np
    import torch
    from transformers import AutoModelForImageTextToText

    from cocoa import Embedder

    res: dict[str, Any] = {}
    t = time.perf_counter()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    hf = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype)
    keys = list(hf.state_dict())
    res.update(hf_class=type(hf).__name__, hf_params=sum(p.numel() for p in hf.parameters()),
               adapter_tensors=sum(1 for k in keys if "lora_" in k),
               image_token_id=int(hf.config.image_token_id), reload_s=round(time.perf_counter() - t, 1))
    res["params_match_base"] = res["hf_params"] == base["params"]
    del hf
    res.update(_weight_change(Path(base["dir"]), model_dir))
    t = time.perf_counter()
    emb = Embedder.from_pretrained(model_dir, device="cuda" if torch.cuda.is_available() else "cpu",
                                   dtype="bfloat16" if precision == "bf16" else "float32")
    rng = random.Random(7)
    side = int(math.isqrt(emb.spec.image_max_pixels or STAGE3_SIDE**2))
    texts = ["a small red cube left of a blue sphere", "two metal cylinders", "the yellow star"]
    images = [_image(rng, side) for _ in range(2)]
    et = emb.encode(texts=texts)
    ei = emb.encode(images=images, texts=["Represent the given image.", "Find the large shiny object."])
    res.update(embed_s=round(time.perf_counter() - t, 1), embed_dim=int(et.shape[1]), text_shape=list(et.shape),
               image_shape=list(ei.shape), spec_attention=emb.spec.attention, spec_max_pixels=emb.spec.image_max_pixels,
               eos_token=emb.spec.eos_token, eos_token_id=emb.spec.eos_token_id, mask_token_id=emb.spec.mask_token_id,
               finite=bool(np.isfinite(et).all() and np.isfinite(ei).all()),
               norms=[round(float(x), 4) for x in np.linalg.norm(np.concatenate([et, ei]), axis=1)])
    return res


def _weight_change(base_dir: Path, model_dir: Path) -> dict[str, Any]:
    """Share of elements changed by merging (one LLM q_proj and one ViT qkv weight), base vs stage-3 model."""
    from safetensors import safe_open

    def tensors(d: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as s:
                for k in s.keys():
                    if k.endswith(("layers.0.self_attn.q_proj.weight", "blocks.0.attn.qkv.weight")):
                        out[k.split("layers.0.")[-1].split("blocks.0.")[-1]] = s.get_tensor(k).float()
        return out

    a, b = tensors(base_dir), tensors(model_dir)
    return {"changed_share": {k: round(float((a[k] != b[k]).float().mean()), 4) for k in a if k in b}}


def run_one(name: str, a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Build ``name`` at real dimensions, run the paper recipe, reload, embed. Runs in this process."""
    import torch

    from cocoa.train.metrics import read_metrics
    from cocoa.train.run import run_training

    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    rss = PeakRSS()
    rss.start()
    base = build_model_dir(name, work / "base", dtype=a.precision, text_layers=a.text_layers,
                           vision_depth=a.vision_depth, seed=a.seed, toy=a.toy,
                           device="cuda" if torch.cuda.is_available() else "cpu")
    base["peak_rss_gib"] = round(rss.stop(), 2)
    _say(f"{name}: built {base['params'] / 1e6:,.0f} M parameters ({base['text_layers']} LLM layers, "
         f"{base['vision_depth']} ViT blocks, {a.precision}) in {base['build_and_save_s']} s")
    data = make_workspace(work / "shards", rows12=a.batch12, rows3=a.batch3, side12=a.side12, side3=a.side3)
    out = work / "run"
    cfg = train_config(Path(base["dir"]), data, out, a)
    with Observer() as obs:
        result = run_training(cfg)
    stages: dict[str, Any] = {}
    for k, rec in sorted(obs.stages.items()):
        rows = read_metrics(out, k)
        rec.pop("t_step", None)
        rec.update(_losses_ok([r["loss"] for r in rows]))
        parts = {key: [r[key] for r in rows] for key in ("loss_mntp", "loss_mae", "acc", "grad_norm") if key in rows[0]}
        rec["parts"] = parts
        rec["lr"] = [r["lr"] for r in rows]
        stages[str(k)] = rec
    res: dict[str, Any] = {"name": name, "base": base, "stages": stages, "model_dirs": result["stages"]}
    last = Path(result["stages"][max(result["stages"])])
    rss.start()
    res["reload"] = reload_and_embed(last, base, a.precision)
    res["reload"]["peak_rss_gib"] = round(rss.stop(), 2)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["peak_rss_gib"] = max([base["peak_rss_gib"], res["reload"]["peak_rss_gib"]]
                              + [s.get("peak_rss_gib", 0) for s in stages.values()])
    return res


# ---------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------
def _say(msg: str) -> None:
    print(msg, flush=True)


def report(res: dict[str, Any], out: Any = None) -> str:
    lines: list[str] = []
    p = lines.append
    b = res["base"]
    what = {"full_depth": "FULL DEPTH, ", "recipe": ""}.get(res.get("phase", ""), "")
    p(f"## {res['name']} ({what}random init at the dimensions of {b['hub']}): {b['params'] / 1e6:,.1f} M parameters, "
      f"{b['text_layers']} LLM layers, {b['vision_depth']} ViT blocks, {b['dtype']} weights")
    p(f"built + saved in {b['build_and_save_s']} s; tokenizer {b['len_tokenizer']} tokens (ids to "
      f"{b['len_tokenizer'] - 1}, <|mask|> added by cocoa at load), embedding rows {VOCAB_SIZE}")
    for k, s in res["stages"].items():
        p(f"### stage {k}: {s['steps']} steps x batch {s['batch_size']} (micro {s['micro_batch_size']}), "
          f"{s['trainable_total']:,} of {s['params_total']:,} parameters trainable")
        for g, v in s["trainable"].items():
            extra = f", {v['adapted_modules']} adapted modules" if v["adapted_modules"] else ""
            mag = f" (DoRA magnitudes {v['dora_magnitude']:,})" if v["dora_magnitude"] else ""
            p(f"    {g:<34} {v['params']:>12,}{mag}{extra}")
        for role, shapes in s["shapes"].items():
            for i, sh in enumerate(shapes):
                p(f"    {role} chunk {i}: padded length {sh['padded_length']}, lengths {sh['lengths']}, "
                  f"image tokens/sample {sh['image_tokens']}, ViT patches {sh['patches']}")
        p(f"    s/step {s['step_s']} (micro forward+backward {s['micro_s']}); build {s.get('build_s')} s, merge+save "
          f"{s.get('finish_s')} s; peak RSS {s.get('peak_rss_gib')} GiB")
        parts = "; ".join(f"{key} {v}" for key, v in s["parts"].items())
        dec = (f"decreasing={s['decreasing']} monotone={s['monotone']}" if len(s["losses"]) > 1
               else "decreasing=n/a (one step)")
        gpu = f", peak GPU memory {s['peak_gpu_gib']} GiB" if s.get("peak_gpu_gib") is not None else ""
        p(f"    loss {s['losses']} finite={s['finite']} {dec}; {parts}{gpu}")
    r = res["reload"]
    p(f"### reload + embed: {r['hf_class']} via AutoModelForImageTextToText, {r['hf_params']:,} parameters "
      f"(= base: {r['params_match_base']}), adapter tensors {r['adapter_tensors']}, merged weights changed "
      f"{r['changed_share']}; Embedder: dim {r['embed_dim']}, texts {r['text_shape']}, images {r['image_shape']}, "
      f"finite={r['finite']}, norms {r['norms']}, attention {r['spec_attention']}, image max pixels "
      f"{r['spec_max_pixels']}, EOS {r['eos_token']} ({r['eos_token_id']}), <|mask|> id {r['mask_token_id']}; "
      f"{r['reload_s'] + r['embed_s']:.1f} s")
    p(f"total {res['seconds']} s, peak RSS {res['peak_rss_gib']} GiB")
    text = "\n".join(lines)
    print(text, file=out or sys.stdout, flush=True)
    return text


def summary_markdown(results: dict[str, Any]) -> str:
    """Markdown tables of a saved run (``--summarize JSON``): one row per model, phase and stage."""
    L = ["| model | depth (LLM / ViT) | stage | steps x batch (micro) | adapted modules LLM attn / MLP, ViT | "
         "trainable params | image tokens / sample | sequence lengths | s/step | peak RSS GiB | loss per step |",
         "|---|---|---:|---|---|---:|---|---|---|---:|---|"]
    runs = [(n, r) for n, r in results.get("models", {}).items()] + \
        [(n + " (full depth)", r) for n, r in results.get("full_depth", {}).items()]
    for name, r in runs:
        b = r["base"]
        for k, s in r["stages"].items():
            g = s["trainable"]
            llm_a = sum(v["adapted_modules"] for key, v in g.items() if key.startswith("LLM attention"))
            llm_m = sum(v["adapted_modules"] for key, v in g.items() if key.startswith("LLM MLP"))
            vit = sum(v["adapted_modules"] for key, v in g.items() if key.startswith("ViT"))
            toks = sorted({t for sh in sum(s["shapes"].values(), []) for t in sh["image_tokens"] if t})
            lens = sorted({x for sh in sum(s["shapes"].values(), []) for x in sh["lengths"]})
            L.append(f"| {name} | {b['text_layers']} / {b['vision_depth']} | {k} | {s['steps']} x {s['batch_size']} "
                     f"({s['micro_batch_size']}) | {llm_a} / {llm_m}, {vit} | {s['trainable_total']:,} | "
                     f"{', '.join(map(str, toks))} | {lens[0]}-{lens[-1]} | {', '.join(f'{x:.1f}' for x in s['step_s'])} | "
                     f"{s.get('peak_rss_gib')} | {', '.join(f'{x:.4f}' for x in s['losses'])} |")
    L += ["", "| model | parameters | build + save s | reload: class, adapter tensors, params = base | Embedder: dim, "
          "finite, norms | EOS / <\\|mask\\|> ids | run s | peak RSS GiB |", "|---|---:|---:|---|---|---|---:|---:|"]
    for name, r in runs:
        b, rl = r["base"], r["reload"]
        L.append(f"| {name} | {b['params']:,} | {b['build_and_save_s']} | {rl['hf_class']}, {rl['adapter_tensors']}, "
                 f"{rl['params_match_base']} | {rl['embed_dim']}, {rl['finite']}, {min(rl['norms']):.3f}-"
                 f"{max(rl['norms']):.3f} | {rl['eos_token_id']} / {rl['mask_token_id']} | {r['seconds']:.0f} | "
                 f"{r['peak_rss_gib']} |")
    return "\n".join(L) + "\n"


def check(res: dict[str, Any]) -> list[str]:
    """What must hold at real dimensions; returns the failures (empty: pass)."""
    bad = []
    for k, s in res["stages"].items():
        if not s["finite"]:
            bad.append(f"stage {k}: non-finite loss {s['losses']}")
        elif len(s["losses"]) > 1 and not s["decreasing"]:
            bad.append(f"stage {k}: loss did not decrease on the repeated batch {s['losses']}")
        vit = [g for g in s["trainable"] if g.startswith("ViT")]
        if not vit or not any(g.startswith("LLM") for g in s["trainable"]):
            bad.append(f"stage {k}: adapters missing on the ViT or the LLM ({sorted(s['trainable'])})")
    r = res["reload"]
    if r["adapter_tensors"] or not r["params_match_base"] or not r["finite"]:
        bad.append(f"reload: adapter tensors {r['adapter_tensors']}, params match {r['params_match_base']}, "
                   f"finite {r['finite']}")
    return bad


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen2-vl-2b,qwen2.5-vl-3b", help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--stages", default="1,2,3")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per stage")
    ap.add_argument("--batch12", type=int, default=2, help="global batch of stages 1-2 (= rows of mix/)")
    ap.add_argument("--batch3", type=int, default=2, help="stage-3 contrastive batch (= rows of original/)")
    ap.add_argument("--micro", type=int, default=1, help="micro batch / GradCache chunk")
    ap.add_argument("--side12", type=int, default=STAGE12_SIDE, help="image side of stages 1-2 (px)")
    ap.add_argument("--side3", type=int, default=STAGE3_SIDE, help="image side of stage 3 (px)")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--lora-dropout", type=float, default=0.05, help="the paper preset's 0.05 (DoRA recomputes the "
                    "base projections when it is > 0)")
    ap.add_argument("--no-grad-ckpt", action="store_true", help="no gradient checkpointing (the paper train.yaml has it)")
    ap.add_argument("--toy", action="store_true", help="toy widths, real tokenizer and ids (gpu_check --cpu)")
    ap.add_argument("--text-layers", type=int, default=None, help="fewer LLM layers (real width)")
    ap.add_argument("--vision-depth", type=int, default=None, help="fewer ViT blocks (real width)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one, removed)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--full-depth", default="none", help="after each model's run, also run these stages (e.g. 1) at "
                    "FULL depth for one step of one sample (stage 3: two), with merge, reload and Embedder; none: skip")
    ap.add_argument("--in-process", action="store_true", help="run the models in this process (tests)")
    ap.add_argument("--summarize", default=None, help="print markdown tables of a saved --json file and exit")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.names = [n.strip() for n in a.models.split(",") if n.strip()]
    for n in a.names:
        if n not in MODELS:
            ap.error(f"--models: unknown model {n!r}; choose from {', '.join(MODELS)}")
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    names = a.names
    if a.summarize:
        text = summary_markdown(json.loads(Path(a.summarize).read_text()))
        print(text)
        return {"summary": text}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("COCOA_PROGRESS", "plain")

    if a._child:  # one model, results as JSON to the given file
        res = run_one(names[0], a, Path(a.work))
        Path(a._child).write_text(json.dumps(res))
        return res

    import platform

    t0 = time.perf_counter()
    results: dict[str, Any] = {"argv": sys.argv[1:] if argv is None else argv, "machine": platform.node(),
                               "cpus": os.cpu_count(), "load_before": os.getloadavg(),
                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "precision": a.precision,
                               "models": {}}
    given = list(argv if argv is not None else sys.argv[1:])
    full = [] if a.full_depth in ("", "none") else [str(k) for k in a.full_depth.split(",")]
    # phase "full depth": the given stages at the real depth, one optimizer step of one sample (stage 3: two)
    full_args = ["--text-layers", "0", "--vision-depth", "0", "--stages", ",".join(full), "--steps", "1",
                 "--batch12", "1", "--batch3", "2", "--micro", "1"]
    results["full_depth"] = {}
    if a.work:
        Path(a.work).mkdir(parents=True, exist_ok=True)  # --work DIR that does not exist yet: made, not a traceback
    with tempfile.TemporaryDirectory(prefix="cocoa-real-dims-", dir=a.work) as tmp:
        for n in names:
            for phase, extra in (("recipe", []), ("full_depth", full_args if full else None)):
                if extra is None:
                    continue
                work = Path(tmp) / f"{n}-{phase}"
                if a.in_process:
                    res = run_one(n, parse_args(given + extra + ["--models", n]), work)
                else:
                    out_json = Path(tmp) / f"{n}-{phase}.json"
                    cmd = [sys.executable, str(Path(__file__).resolve()), *given, *extra, "--models", n,
                           "--work", str(work), "--_child", str(out_json)]
                    proc = subprocess.run(cmd)
                    if proc.returncode != 0:
                        raise SystemExit(f"real dims: {n} ({phase}) failed (exit {proc.returncode}); see the output above")
                    res = json.loads(out_json.read_text())
                res["phase"] = phase
                (results["models"] if phase == "recipe" else results["full_depth"])[n] = res
                report(res)
                import shutil

                shutil.rmtree(work, ignore_errors=True)
                if a.json:  # after every run, so a long run leaves what it measured
                    Path(a.json).write_text(json.dumps(results, indent=2))
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["load_after"] = os.getloadavg()
    results["failures"] = {n: check(r) for n, r in results["models"].items()}
    results["failures"].update({f"{n} (full depth)": check(r) for n, r in results["full_depth"].items()})
    ok = not any(results["failures"].values())
    _say(f"real dims: {', '.join(names)} in {results['seconds']} s -> {'PASS' if ok else 'FAIL'}"
         + ("" if ok else f" {results['failures']}"))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    r = main()
    sys.exit(0 if not any(r.get("failures", {}).values()) else 1)
