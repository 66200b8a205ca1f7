"""The tiny model's tokenizer: Qwen2-VL's special tokens (+ ``<|mask|>``), a built-in corpus (the scenes
vocabulary plus English function words) and a byte-level BPE trained on it deterministically, wrapped as
a transformers Qwen2 tokenizer with a short chat template."""

from __future__ import annotations

import functools
import json

DEFAULT_VOCAB_SIZE = 4096  # BPE target; the model's vocab is the tokenizer's actual size

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


def build_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE):  # type: ignore[no-untyped-def]
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
