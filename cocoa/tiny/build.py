"""The offline tiny Qwen2-VL / Qwen2.5-VL: a real HF model built from a small config, with no download.

:func:`build_tiny_model` writes a directory that loads exactly like a hub checkpoint::

    AutoModelForImageTextToText.from_pretrained(dir)   # or Qwen2VLForConditionalGeneration
    AutoProcessor.from_pretrained(dir)                 # Qwen2VLProcessor

It holds ``config.json`` + ``model.safetensors`` (random init from ``seed``), a byte-level BPE tokenizer
trained locally and deterministically on a built-in corpus (:mod:`cocoa.tiny.tokenizer`: the scenes vocabulary
plus English function words, with Qwen2-VL's special tokens and ``<|mask|>``), a ``Qwen2VLProcessor`` with small
min/max pixels, and ``cocoa.json`` (:class:`cocoa.model.spec.EmbeddingSpec`).

:func:`tiny_model_dir` builds the same once and caches it under ``$COCOA_CACHE`` (default
``~/.cache/cocoa``), keyed by a hash of the builder settings.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from ..records import RecordError, canonical_json, digest
from ..model.spec import EmbeddingSpec
from .tokenizer import CHAT_TEMPLATE, DEFAULT_VOCAB_SIZE, EOS_TOKEN, MASK_TOKEN, SPECIAL_TOKENS, build_tokenizer

Arch = Literal["qwen2-vl", "qwen2.5-vl"]
ARCHS: tuple[str, ...] = ("qwen2-vl", "qwen2.5-vl")

# Bump when the builder's output changes for the same settings (invalidates cached builds).
BUILDER_VERSION = 1

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
IMAGE_SIZE = 112  # default scenes image side: 8x8 patches -> 16 LLM tokens
MIN_PIXELS = 56 * 56
MAX_PIXELS = 112 * 112

# Default architecture settings. Any of them can be overridden through ``build_tiny_model(**overrides)``.
DEFAULTS: dict[str, Any] = {
    "vocab_size": DEFAULT_VOCAB_SIZE,  # BPE target; the model's vocab is the tokenizer's actual size
    "hidden_size": 192,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 512,
    "vision_embed_dim": 128,
    "vision_depth": 3,
    "vision_num_heads": 4,
    "vision_intermediate_size": 256,  # Qwen2.5-VL only (Qwen2-VL uses mlp_ratio)
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
    "min_pixels": MIN_PIXELS,
    "max_pixels": MAX_PIXELS,
}


def _settings(arch: str, seed: int, overrides: dict[str, Any]) -> dict[str, Any]:
    if arch not in ARCHS:
        raise RecordError(f"unknown tiny-model arch {arch!r}; choose one of {', '.join(ARCHS)}")
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise RecordError(f"unknown tiny-model setting(s) {unknown}; known: {sorted(DEFAULTS)}")
    s = dict(DEFAULTS)
    s.update(overrides)
    if s["hidden_size"] % s["num_attention_heads"]:
        raise RecordError("tiny model: hidden_size must be a multiple of num_attention_heads")
    head_dim = s["hidden_size"] // s["num_attention_heads"]
    if head_dim % 8:
        raise RecordError(f"tiny model: head dim {head_dim} must be a multiple of 8 (M-RoPE sections)")
    return {"arch": arch, "seed": int(seed), "builder_version": BUILDER_VERSION, **s}


def _mrope_section(head_dim: int) -> list[int]:
    # Qwen2-VL splits head_dim/2 rotary frequencies over (time, height, width) as 16:24:24 (of 64).
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def make_config(settings: dict[str, Any], vocab_size: int, special_ids: dict[str, int]):  # type: ignore[no-untyped-def]
    """The HF config for the given builder settings (vocab and token ids from the tokenizer)."""
    s = settings
    head_dim = s["hidden_size"] // s["num_attention_heads"]
    text = dict(
        vocab_size=vocab_size, hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_hidden_layers"], num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_key_value_heads"], max_position_embeddings=s["max_position_embeddings"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(head_dim)},
        bos_token_id=None, eos_token_id=special_ids["<|endoftext|>"], pad_token_id=special_ids["<|endoftext|>"],
        tie_word_embeddings=s["tie_word_embeddings"], rms_norm_eps=1e-6, initializer_range=0.02,
        use_cache=True,
    )
    common = dict(
        image_token_id=special_ids["<|image_pad|>"], video_token_id=special_ids["<|video_pad|>"],
        vision_start_token_id=special_ids["<|vision_start|>"], vision_end_token_id=special_ids["<|vision_end|>"],
        tie_word_embeddings=s["tie_word_embeddings"],
    )
    if s["arch"] == "qwen2-vl":
        from transformers import Qwen2VLConfig

        vision = dict(
            depth=s["vision_depth"], embed_dim=s["vision_embed_dim"], num_heads=s["vision_num_heads"],
            mlp_ratio=2, hidden_size=s["hidden_size"], patch_size=PATCH_SIZE, spatial_merge_size=MERGE_SIZE,
            temporal_patch_size=TEMPORAL_PATCH_SIZE, in_channels=3, initializer_range=0.02,
        )
        cfg = Qwen2VLConfig(text_config=text, vision_config=vision, **common)
    else:
        from transformers import Qwen2_5_VLConfig

        depth = s["vision_depth"]
        vision = dict(
            depth=depth, hidden_size=s["vision_embed_dim"], intermediate_size=s["vision_intermediate_size"],
            num_heads=s["vision_num_heads"], out_hidden_size=s["hidden_size"], patch_size=PATCH_SIZE,
            spatial_merge_size=MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE, in_channels=3,
            window_size=PATCH_SIZE * MERGE_SIZE * 4, fullatt_block_indexes=[depth - 1], initializer_range=0.02,
        )
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
    return cfg


def build_processor(tokenizer, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,  # type: ignore[no-untyped-def]
                    arch: Arch = "qwen2-vl"):
    """The processor the hub checkpoints ship: ``Qwen2VLProcessor`` (``Qwen2_5_VLProcessor`` for 2.5)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=PATCH_SIZE, merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
    )
    video_processor = Qwen2VLVideoProcessor(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=PATCH_SIZE, merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
    )
    cls = Qwen2VLProcessor if arch == "qwen2-vl" else Qwen2_5_VLProcessor
    return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
               chat_template=CHAT_TEMPLATE)


def build_tiny_model(out_dir: str | Path, arch: Arch = "qwen2-vl", seed: int = 0, **overrides: Any) -> Path:
    """Build a tiny Qwen2-VL (or Qwen2.5-VL) from scratch and save it to ``out_dir``.

    Deterministic: the same arguments give byte-identical weights and tokenizer files. ``overrides``
    change entries of :data:`DEFAULTS` (e.g. ``hidden_size=128``). Returns ``out_dir``.
    """
    import torch

    settings = _settings(arch, seed, overrides)
    out = Path(out_dir)
    from ..fs import has_content

    if has_content(out):
        raise RecordError(f"{out} already exists and is not empty; choose a new --out directory or delete it")
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(settings["vocab_size"])
    special_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = make_config(settings, len(tokenizer), special_ids)

    if settings["arch"] == "qwen2-vl":
        from transformers import Qwen2VLForConditionalGeneration as ModelCls
    else:
        from transformers import Qwen2_5_VLForConditionalGeneration as ModelCls
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = ModelCls(config)
    finally:
        torch.random.set_rng_state(state)
    model.generation_config.eos_token_id = [special_ids["<|endoftext|>"], special_ids["<|im_end|>"]]
    model.generation_config.pad_token_id = special_ids["<|endoftext|>"]
    model.generation_config.bos_token_id = None

    processor = build_processor(tokenizer, settings["min_pixels"], settings["max_pixels"], settings["arch"])
    model.save_pretrained(out)
    processor.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    EmbeddingSpec(
        arch=settings["arch"], eos_token=EOS_TOKEN, eos_token_id=special_ids[EOS_TOKEN], mask_token=MASK_TOKEN,
        mask_token_id=special_ids[MASK_TOKEN], image_min_pixels=settings["min_pixels"],
        image_max_pixels=settings["max_pixels"], stages=[],
        base_model=f"cocoa-tiny-{settings['arch']} (offline, random init, seed {seed})",
        extra={"tiny": settings, "num_parameters": n_params},
    ).save(out)
    return out


def cache_root() -> Path:
    return Path(os.environ.get("COCOA_CACHE") or Path.home() / ".cache" / "cocoa")


def settings_key(arch: str = "qwen2-vl", seed: int = 0, **overrides: Any) -> str:
    """The cache key of a tiny build: a hash of every setting that changes its files."""
    import tokenizers
    import transformers

    s = _settings(arch, seed, overrides)
    s["transformers"] = transformers.__version__
    s["tokenizers"] = tokenizers.__version__
    return digest(canonical_json(s))[:16]


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "cocoa.json").is_file() and (
        path / "model.safetensors").is_file()


def cached_build(final: Path, build) -> Path:  # type: ignore[no-untyped-def]
    """Run ``build(tmp_dir)`` in a temporary directory beside ``final`` and rename it into place.

    If ``final`` already holds a complete model, return it. Concurrent callers serialise on a lock file
    beside it (the second one finds the finished model); a reader never sees a half-written model.
    """
    if is_model_dir(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # One builder per key: a second process waits for the first instead of repeating the work.
    with open(final.parent / f".{final.name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_model_dir(final):
            return final
        for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a builder that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            build(tmp / "model")
            if final.exists() and not is_model_dir(final):
                shutil.rmtree(final, ignore_errors=True)  # a leftover of an interrupted build
            try:
                os.rename(tmp / "model", final)
            except OSError:
                if not is_model_dir(final):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def tiny_model_dir(arch: Arch = "qwen2-vl", seed: int = 0, **overrides: Any) -> Path:
    """The tiny model for these settings, built once and cached under ``$COCOA_CACHE/tiny/``."""
    key = settings_key(arch, seed, **overrides)
    final = cache_root() / "tiny" / f"{arch}-s{seed}-{key}"
    return cached_build(final, lambda d: build_tiny_model(d, arch=arch, seed=seed, **overrides))
