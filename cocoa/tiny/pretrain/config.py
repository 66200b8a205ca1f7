"""Settings of the generative pre-training (``cocoa-train pretrain-tiny``) and the names it saves under."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ...config import Config

PRETRAIN_VERSION = 3  # bump when the same settings and data would train another model
DEFAULT_STEPS = 400
METRICS_FILE = "pretrain_metrics.jsonl"
ALIGN_METRICS_FILE = "align_metrics.jsonl"  # one row per vision-alignment step


class PretrainConfig(Config):
    """Settings of `cocoa-train pretrain-tiny` (generative pre-training of the tiny model)."""

    data: str | None = Field(
        None, description="directory with original/ PairRecord shards (e.g. a scenes benchmark root) or a "
                          "PairRecord dataset directory; default: scenes training pairs generated in memory")
    out: str | None = Field(None, description="copy the pre-trained model here (default: only the cache)")
    steps: int = Field(DEFAULT_STEPS, ge=1, description="optimizer steps")
    base: str | None = Field(None, description="start from this saved model (default: the random-init tiny model)")
    arch: Literal["qwen2-vl", "qwen2.5-vl"] = Field("qwen2-vl", description="tiny architecture when no --base is given")
    seed: int = Field(0, description="seed of the tiny base model, the data order and the caption phrasing")
    batch_size: int = Field(32, ge=1, description="examples per step")
    lr: float = Field(1e-3, gt=0, description="peak AdamW learning rate")
    warmup: float = Field(0.05, ge=0, lt=1, description="fraction of steps of linear warm-up")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, gt=0, description="gradient-norm clipping")
    curriculum: float = Field(
        0.0, ge=0, lt=1, description="fraction of the steps, at the start, trained only on short image-only answers "
                                     "(object count, objects in reading order, labels/answers); 0 = mix from step 1")
    align_steps: int = Field(
        300, ge=0, description="steps of contrastive image-text alignment of the vision tower before generative "
                               "pre-training (what a CLIP-initialised ViT gives real MLLMs); 0 = none")
    align_batch_size: int = Field(64, ge=2, description="image-text pairs per alignment step")
    align_lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the alignment step")
    max_length: int = Field(160, ge=32, description="longest sequence in tokens (longer examples are skipped and counted)")
    scenes_train: int = Field(4000, ge=1, description="scenes training pairs to generate when --data is not given")
    overwrite: bool = Field(False, description="replace an existing --out directory")
    progress: bool = Field(True, description="show a progress bar")


def trained_settings(config: PretrainConfig) -> dict[str, Any]:
    """The settings that make another model: part of the cache key and of the saved ``extra``."""
    keep = ("steps", "arch", "seed", "batch_size", "lr", "warmup", "weight_decay", "grad_clip", "max_length",
            "curriculum", "align_steps", "align_batch_size", "align_lr")
    return {k: getattr(config, k) for k in keep}

