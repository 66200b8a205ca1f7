"""The offline tiny Qwen2-VL / Qwen2.5-VL: a real HF model built from a small config, with no download.

:func:`build_tiny_model` writes a directory that loads exactly like a hub checkpoint::

    AutoModelForImageTextToText.from_pretrained(dir)   # or Qwen2VLForConditionalGeneration
    AutoProcessor.from_pretrained(dir)                 # Qwen2VLProcessor

It holds ``config.json`` + ``model.safetensors`` (random init from ``seed``), a byte-level BPE tokenizer
trained locally and deterministically on a built-in corpus (the scenes vocabulary plus English function
words, with Qwen2-VL's special tokens and ``<|mask|>``), a ``Qwen2VLProcessor`` with small
min/max pixels, and ``cocoa.json`` (:class:`cocoa.model.spec.EmbeddingSpec`).

:func:`tiny_model_dir` builds the same once and caches it under ``$COCOA_CACHE`` (default
``~/.cache/cocoa``), keyed by a hash of the builder settings.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from ..records import RecordError, canonical_json, digest
from ..model.spec import EmbeddingSpec

Arch = Literal["qwen2-vl", "qwen2.5-vl"]
ARCHS: tuple[str, ...] = ("qwen2-vl", "qwen2.5-vl")

# Bump when the builder's output changes for the same settings (invalidates cached builds).
BUILDER_VERSION = 1

EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
# Order fixes the ids: <|endoftext|> = 0, ..., <|mask|> = 7 (the same in every tiny build).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|mask|>",
)

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
IMAGE_SIZE = 112  # default scenes image side: 8x8 patches -> 16 LLM tokens
MIN_PIXELS = 56 * 56
MAX_PIXELS = 112 * 112

# Default architecture settings. Any of them can be overridden through ``build_tiny_model(**overrides)``.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 4096,  # BPE target; the model's vocab is the tokenizer's actual size
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

# A short chat template in Qwen2-VL's format, so `apply_chat_template` and `transformers serve` work.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# --------------------------------------------------------------------------------------------------
# Built-in tokenizer corpus
# --------------------------------------------------------------------------------------------------
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "magenta", "brown", "gray", "grey",
          "black", "white", "pink", "teal", "olive", "navy", "gold", "silver", "beige", "maroon", "lime"]
SHAPES = ["circle", "square", "triangle", "rectangle", "star", "diamond", "hexagon", "pentagon", "ellipse",
          "cross", "heart", "ring", "cube", "sphere", "cylinder", "cone", "pyramid", "disk", "oval", "arrow"]
SIZES = ["tiny", "small", "medium", "large", "big", "huge", "little", "tall", "short", "wide", "narrow"]
MATERIALS = ["metal", "metallic", "rubber", "matte", "shiny", "glossy", "striped", "dotted", "checkered",
             "solid", "plain", "wooden", "glass", "plastic", "textured", "smooth", "rough", "outlined",
             "hollow", "filled", "stripes", "dots", "checks", "texture", "pattern"]
RELATIONS = ["left", "right", "above", "below", "behind", "front", "under", "over", "next", "beside",
             "near", "far", "between", "inside", "outside", "overlapping", "overlaps", "touching",
             "top", "bottom", "center", "middle", "corner", "upper", "lower", "side", "edge", "closest",
             "farthest", "leftmost", "rightmost", "topmost", "bottommost", "around", "across", "along"]
COUNTS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "no",
          "single", "pair", "several", "many", "few", "none", "both", "each", "every", "all", "only",
          "more", "fewer", "less", "most", "same", "different", "number", "count", "total", "first",
          "second", "third", "fourth", "fifth", "sixth", "last", "other", "another"]
QUESTION_WORDS = ["what", "which", "who", "where", "when", "why", "how", "whose", "whom", "is", "are", "does",
                  "do", "can", "there", "many", "much", "color", "colour", "shape", "size", "material",
                  "kind", "type", "object", "objects", "thing", "things", "item", "items", "image",
                  "picture", "photo", "scene", "canvas", "background", "text", "word", "letter", "label",
                  "written", "printed", "says", "reads", "shows", "show", "contains", "contain", "depicts",
                  "describe", "find", "select", "choose", "answer", "question", "caption", "represent",
                  "given", "following", "retrieve", "matches", "match", "region", "crop", "referring",
                  "expression", "instruction", "query", "target", "classify", "category", "class",
                  "identify", "locate", "visible", "located", "positioned", "placed", "compared", "rendered",
                  "rendering", "portion", "isolates", "isolate", "finish", "surface", "largest", "smallest",
                  "description", "fits", "region", "showing", "character", "characters", "printed", "total",
                  "give", "would", "say", "cropped", "main", "photo", "letter", "digit", "number", "numbers"]
FUNCTION_WORDS = ["the", "a", "an", "of", "to", "in", "on", "at", "by", "for", "with", "and", "or", "not",
                  "but", "if", "then", "than", "as", "from", "into", "onto", "it", "its", "this", "that",
                  "these", "those", "there", "here", "be", "been", "being", "was", "were", "has", "have",
                  "had", "i", "you", "he", "she", "we", "they", "them", "their", "my", "your", "our",
                  "his", "her", "some", "any", "such", "also", "very", "just", "so", "up", "down", "out",
                  "off", "about", "after", "before", "while", "yes", "please", "like", "look", "looks",
                  "see", "seen", "make", "made", "get", "use", "used", "using", "other", "own", "into",
                  "will", "would", "should", "could", "may", "might", "must", "shall", "one", "ones",
                  "user", "assistant", "system", "represent", "embedding", "summarize", "above", "word",
                  "sentence", "short", "long", "detailed", "description", "summary", "information"]
ENGLISH = """time year people way day man woman child world life hand part place case week company system
program work government number night point home water room mother area money story fact month lot right
study book eye job word business issue side kind head house service friend father power hour game line end
member law car city community name president team minute idea kid body information back parent face others
level office door health person art war history party result change morning reason research girl guy moment
air teacher force education foot boy age policy process music market sense nation plan college interest death
experience effect class control care field development role effort rate heart drug show leader light voice
wife police mind price report decision son view relationship town road arm difference value building action
model season society tax director position player record paper space ground form event official matter center
couple site project activity star table need court oil situation cost industry figure street image phone data
picture practice piece land product doctor wall patient worker news test movie north love support technology
step baby computer type attention film tree source organization hair window evidence population truth
say go know think take see come want use find give tell ask seem feel try leave call keep let begin help talk
turn start run move live believe hold bring happen write provide sit stand lose pay meet include continue set
learn lead understand watch follow stop create speak read allow add spend grow open walk win offer remember
consider appear buy wait serve die send expect build stay fall cut reach kill remain suggest raise pass sell
require decide return explain hope develop carry break receive agree support hit produce eat cover catch draw
good new old great high different small large big long little own important young early public bad able late
hard real best better sure free full special easy clear recent certain personal open whole strong possible
true black white dark bright light heavy round flat square straight curved empty close low deep simple
similar exact main central general typical correct wrong visual random local single common natural
always never often sometimes usually again still already even ever almost together away only quite rather
really actually probably perhaps maybe instead least within without through during against among toward
upon across behind beyond except per via whether either neither nor although because since unless until
whereas yet thus therefore however otherwise meanwhile""".split()
DIGITS = [str(i) for i in range(0, 21)] + ["100", "1000"]
LETTERS = list("abcdefghijklmnopqrstuvwxyz") + list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
PUNCT = [".", ",", "?", "!", ":", ";", "'", '"', "(", ")", "-", "/", "#", "<", ">", "*", "+", "=", "%", "&"]


def tokenizer_corpus() -> list[str]:
    """The fixed training corpus of the tiny tokenizer (deterministic, independent of any seed)."""
    import random

    rng = random.Random(1234)
    words = sorted(set(COLORS + SHAPES + SIZES + MATERIALS + RELATIONS + COUNTS + QUESTION_WORDS + FUNCTION_WORDS
                       + ENGLISH))
    lines: list[str] = []
    # every word alone, capitalised, plural, with a leading space (as it appears mid-sentence); the
    # mid-sentence forms twice, so that BPE (min_frequency=2) learns them as whole tokens
    for w in words:
        lines += [w, w.capitalize(), f" {w}", f" {w}", f" {w.capitalize()}", f" {w}s", f"{w.upper()}"]
    lines += DIGITS + [" ".join(DIGITS), " ".join(LETTERS), " ".join(PUNCT)]
    templates = [
        "a {size} {color} {material} {shape}.",
        "There is a {size} {color} {shape} {rel} the {color2} {shape2}.",
        "The image shows {count} objects: a {color} {shape} and a {size} {color2} {shape2}.",
        "What color is the {size} {shape}? {color}",
        "How many {shape}s are there? {digit}",
        "How many {color} objects are in the image? {count}",
        "Is there a {color} {shape} {rel} the {shape2}? yes",
        "Which shape is {rel} the {color} {shape}? {shape2}",
        "What is the material of the {color} {shape}? {material}",
        "What text is written on the {shape}? {letters}",
        "Find the {size} {color} {shape} {rel} of the {color2} {shape2}.",
        "Represent the given image with the following question: what is in the image?",
        "Represent the given image for classification.",
        "Find an image caption describing the given image.",
        "Select the portion of the image that isolates the object labeled as \"{color} {shape}\".",
        "<|image_1|> {color} {shape}",
        "A scene with {count} objects on a {color} background, the {shape} is on the {rel}.",
        "{count} {color} {shape}s, {digit} in total; the {material} one is {size}.",
    ]
    for _ in range(3000):
        t = rng.choice(templates)
        line = t.format(
            size=rng.choice(SIZES), color=rng.choice(COLORS), color2=rng.choice(COLORS),
            material=rng.choice(MATERIALS), shape=rng.choice(SHAPES), shape2=rng.choice(SHAPES),
            rel=rng.choice(RELATIONS), count=rng.choice(COUNTS), digit=rng.choice(DIGITS),
            letters="".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 4))),
        )
        lines.append(line if rng.random() < 0.5 else line.capitalize())
    return lines


@functools.lru_cache(maxsize=4)
def _train_bpe(vocab_size: int) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """(vocab, merges) of the byte-level BPE trained on :func:`tokenizer_corpus` (memoised per process)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    # The same pipeline Qwen2's tokenizer uses, so the wrapper below reproduces it exactly.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    model_state = json.loads(tok.to_str())["model"]
    merges = tuple(tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model_state["merges"])
    return tuple(model_state["vocab"].items()), merges  # type: ignore[return-value]


def build_tokenizer(vocab_size: int = DEFAULTS["vocab_size"]):  # type: ignore[no-untyped-def]
    """Train the byte-level BPE tokenizer (deterministic) and wrap it as a transformers Qwen2 tokenizer."""
    from transformers import AddedToken, Qwen2TokenizerFast

    vocab_items, merges = _train_bpe(vocab_size)
    qtok = Qwen2TokenizerFast(
        vocab=dict(vocab_items), merges=list(merges), unk_token=None, bos_token=None, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
        add_prefix_space=False, clean_up_tokenization_spaces=False, model_max_length=32768,
    )
    qtok.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS[1:]]}
    )
    for i, t in enumerate(SPECIAL_TOKENS):
        got = qtok.convert_tokens_to_ids(t)
        if got != i:
            raise RuntimeError(f"tiny tokenizer: special token {t} got id {got}, expected {i}")
    qtok.chat_template = CHAT_TEMPLATE
    return qtok


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
