"""``CurationConfig``: every curation rule's settings (YAML-loadable; every field is also a CLI flag).

Sections flatten to flags with dashes: ``near.num_perm`` -> ``--near-num-perm``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic import ValidationInfo

from ..config import Config

DEFAULT_REFUSAL = [
    r"\bas an ai\b",
    r"\bas a language model\b",
    r"\bi(?:'m| am) sorry\b",
    r"\bi (?:cannot|can't|can not|am unable to|'m unable to)\b",
    r"\bi(?:'m| am) not able to\b",
    r"\bunable to (?:see|view|access|determine|identify)\b",
]
DEFAULT_HEDGE = [
    r"\bit(?: is|'s) (?:hard|difficult|impossible) to (?:say|tell|determine)\b",
    r"\bi(?:'m| am) not (?:sure|certain)\b",
    r"\bcannot be determined\b",
    r"\bit is unclear (?:what|whether|if)\b",
]
DEFAULT_META = [
    r"\bthe image does not (?:show|contain|depict)\b",
    r"\bno image (?:is|was) (?:provided|attached|shown)\b",
    r"^(?:sure|certainly|of course)[!,.]",
    r"\bhere is (?:a|the) (?:detailed )?(?:description|caption)\b",
    r"\bin this (?:caption|response|answer),? i\b",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _v_strict_int(cls, value: object, info: ValidationInfo) -> object:
        return strict_ints(cls, value, info)


KINDS = ("caption", "qa")  # SynthRecord kinds
# Upper bounds of the settings that size memory or time (a typo such as --near-num-perm 100000000 would
# run for hours or exhaust memory instead of failing at once).
MAX_NUM_PERM = 4096  # MinHash permutations: 8 bytes x num_perm per row; 4096 is 32x the default
MAX_NGRAM = 64  # word n-gram / shingle sizes: texts this long are not near-duplicate evidence anyway
MAX_IMAGE_PIXELS = 1_000_000_000  # the bomb guard itself: decoding more than ~1 Gpixel needs > 3 GB per image
MAX_SEED = 2**32 - 1  # MinHash seed (rensa takes an unsigned integer)


def _kinds(value: list[str], flag: str, empty_hint: str) -> list[str]:
    if not value:
        raise ValueError(f"{flag} is empty: name the kinds to deduplicate ({', '.join(KINDS)}); {empty_hint}")
    if "none" in value and len(value) > 1:
        raise ValueError(f"{flag} 'none' cannot be combined with kinds ({value})")
    return value


def strict_ints(model: type[BaseModel], value: object, info: ValidationInfo) -> object:
    """YAML ``true`` is not a count: refuse a boolean for an ``int`` setting (pydantic would read it as 1)."""
    if isinstance(value, bool) and info.field_name and model.model_fields[info.field_name].annotation is int:
        raise ValueError(f"expected a whole number, not {str(value).lower()}")
    return value


class TextSection(_Section):
    normalize: bool = Field(True, description="Unicode NFC and whitespace collapsing before every rule")
    caption_min_words: int = Field(5, ge=0, description="Shortest caption kept (words)")
    caption_max_words: int = Field(400, ge=1, description="Longest caption kept (words)")
    question_min_words: int = Field(3, ge=0, description="Shortest question kept (words)")
    question_max_words: int = Field(60, ge=1, description="Longest question kept (words)")
    answer_min_words: int = Field(1, ge=0, description="Shortest answer kept (words)")
    answer_max_words: int = Field(150, ge=1, description="Longest answer kept (words)")
    refusal_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_REFUSAL),
                                        description="Case-insensitive regexes marking refusals")
    hedge_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_HEDGE),
                                      description="Case-insensitive regexes marking hedges")
    meta_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_META),
                                     description="Case-insensitive regexes marking meta-talk")

    @model_validator(mode="after")
    def _v_ranges(self) -> TextSection:
        for what in ("caption", "question", "answer"):
            lo, hi = getattr(self, f"{what}_min_words"), getattr(self, f"{what}_max_words")
            if lo > hi:
                raise ValueError(f"--text-{what}-min-words ({lo}) is above --text-{what}-max-words ({hi}): every "
                                 f"{what} would be rejected; lower the minimum or raise the maximum")
        return self


class RepetitionSection(_Section):
    ngram: int = Field(3, ge=1, le=MAX_NGRAM, description="n of the word n-grams counted for the repeated share")
    max_repeated_share: float = Field(0.3, gt=0, le=1, description="Drop if this share of n-grams are repeats")
    min_ngrams: int = Field(8, ge=1, description="Only judge the share on texts with at least this many n-grams")
    max_run: int = Field(4, ge=2, description="Drop if a 1-3 word unit repeats back-to-back this many times")


class QASection(_Section):
    check_question_form: bool = Field(True, description="Questions must end with '?' or start with a question word")
    max_answer_question_overlap: float = Field(0.9, gt=0, le=1,
                                               description="Drop answers whose words are this share of the question's")


class ExactSection(_Section):
    enabled: bool = Field(True, description="Drop exact duplicates (xxh3 digest of the normalised text)")
    global_kinds: list[Literal["caption", "qa", "none"]] = Field(
        default_factory=lambda: ["caption"],
        description="Kinds deduplicated across images (caption, qa; 'none': within each image only)")

    @field_validator("global_kinds")
    @classmethod
    def _v_kinds(cls, v: list[str]) -> list[str]:
        return _kinds(v, "--exact-global-kinds", "write 'none' to deduplicate within each image only, or switch "
                      "exact deduplication off with --no-exact-enabled")


class NearSection(_Section):
    enabled: bool = Field(True, description="Drop near duplicates (MinHash LSH with rensa)")
    kinds: list[Literal["caption", "qa"]] = Field(default_factory=lambda: ["caption"],
                                                  description="Kinds deduplicated across images (caption, qa)")
    shingle: int = Field(3, ge=1, le=MAX_NGRAM, description="Word shingle size")
    num_perm: int = Field(128, ge=8, le=MAX_NUM_PERM, description="MinHash permutations")
    bands: int = Field(16, ge=1, le=MAX_NUM_PERM, description="LSH bands (num_perm must be a multiple)")
    threshold: float = Field(0.7, gt=0, le=1, description="Estimated Jaccard at or above which a candidate is a duplicate")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="MinHash seed")
    max_bucket_pairs: int = Field(64, ge=2, description="Buckets larger than this are linked as a star, not all pairs")

    @model_validator(mode="after")
    def _v_bands(self) -> NearSection:
        if self.enabled and not self.kinds:
            _kinds(self.kinds, "--near-kinds", "or switch near deduplication off with --no-near-enabled")
        if self.num_perm % self.bands:
            raise ValueError(f"num_perm ({self.num_perm}) must be a multiple of bands ({self.bands})")
        return self


class ImageSection(_Section):
    enabled: bool = Field(True, description="Check the referenced images")
    min_side: int = Field(28, ge=1, description="Smallest image side kept (pixels; Qwen2-VL's patch is 14, merge 2)")
    max_pixels: int = Field(40_000_000, ge=1, le=MAX_IMAGE_PIXELS, description="Largest image kept (pixels; bomb guard)")
    max_aspect: float = Field(200.0, gt=1, description="Drop images whose long/short side ratio reaches this")
    dedup: bool = Field(True, description="Drop rows of images that are perceptual near-duplicates of an earlier image")
    phash_distance: int = Field(2, ge=0, le=32, description="pHash Hamming distance at or below which images match")


class DecontamSection(_Section):
    image: bool = Field(True, description="Drop rows whose image is a pHash near-dup of an eval image")
    image_distance: int = Field(2, ge=0, le=32, description="pHash Hamming distance for an eval image match")
    text: bool = Field(True, description="Drop rows whose text overlaps an eval query/target")
    ngram: int = Field(8, ge=1, le=MAX_NGRAM, description="Word n-gram size for text overlap")
    threshold: float = Field(0.8, gt=0, le=1,
                             description="Drop if this share of an eval text's informative n-grams appear in the row's text")
    template_texts: int = Field(10, ge=2, description="N-grams found in this many distinct eval texts are boilerplate "
                                                      "(instructions, templates) and ignored")


class CurationConfig(Config):
    """Settings of `cocoa-data curate` (rules run in the order of the sections)."""

    text: TextSection = Field(default_factory=TextSection)
    repetition: RepetitionSection = Field(default_factory=RepetitionSection)
    qa: QASection = Field(default_factory=QASection)
    exact: ExactSection = Field(default_factory=ExactSection)
    near: NearSection = Field(default_factory=NearSection)
    image: ImageSection = Field(default_factory=ImageSection)
    decontam: DecontamSection = Field(default_factory=DecontamSection)
    examples: int = Field(3, ge=0, le=1000, description="Examples per rule in the report")
    _v_strict_int = field_validator("examples", "batch_rows", mode="before")(classmethod(
        lambda cls, v, info: strict_ints(cls, v, info)))
    batch_rows: int = Field(200_000, ge=1000, le=10_000_000, description="Rows per text-feature batch (bounds memory)")
