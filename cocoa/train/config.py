"""``TrainConfig``: every setting of ``cocoa-train`` in one pydantic model (YAML + one flag per field).

Sections: top-level run settings, ``lora`` (parameter-efficient or full fine-tuning), and one section
per stage (``stage1``, ``stage2``, ``stage3``), flattened to flags such as ``--stage3-lr``.

Defaults follow the CoCoA paper / authors' scripts (LoRA r=8, alpha=64 with DoRA, lr 2e-5, linear
schedule with warmup; stage 1 text mask 0.2, image mask 0.5, lambda 0.5; stage 2 B mask 0.7; stage 3
temperature 0.02, global batch 1024 through GradCache). Those suit 2B/7B backbones on GPUs. The offline
tiny model needs other settings (full fine-tuning, a higher lr, small batches): ``--preset tiny``, which
is also chosen automatically (``--preset auto``) when no ``--model`` is given and the embedded tiny
model is used. Precedence: defaults < preset < YAML file < flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from ..config import Config, ConfigError, _deep_merge

ALL_STAGES = (1, 2, 3)
MAX_STEPS = 1_000_000_000  # optimizer steps of one stage (also bounds --stageK-save-every, --log-every)

# Qwen2-VL / Qwen2.5-VL module names: LLM attention + MLP, vision tower attention (qkv, proj) + MLP.
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                   "qkv", "fc1", "fc2"]


def parse_stages(value: str | list[int] | tuple[int, ...]) -> list[int]:
    """``"1,2,3"`` -> ``[1, 2, 3]``; any non-empty, strictly increasing subset of 1, 2, 3."""
    if isinstance(value, int):
        items: list[Any] = [value]
    elif isinstance(value, str):
        items = [v.strip() for v in value.replace(" ", ",").split(",") if v.strip()]
    else:
        items = list(value)
    stages: list[int] = []
    for v in items:
        try:
            s = int(v)
        except (TypeError, ValueError):
            raise ValueError(f"--stages: {v!r} is not a stage number; use a comma list such as 1,2,3") from None
        if s not in ALL_STAGES:
            raise ValueError(f"--stages: there is no stage {s}; CoCoA has stages 1, 2 and 3 (e.g. --stages 1,2,3 or 3)")
        stages.append(s)
    if not stages:
        raise ValueError("--stages is empty; give an ordered subset of 1,2,3 such as 1,2,3 or 3")
    if len(set(stages)) != len(stages):
        raise ValueError(f"--stages {value}: a stage is repeated; each stage runs at most once")
    if stages != sorted(stages):
        raise ValueError(
            f"--stages {value}: stages must be given in order (stage k starts from stage k-1's output); "
            f"did you mean {','.join(map(str, sorted(stages)))}?"
        )
    return stages


class _Section(BaseModel):
    model_config = {"extra": "forbid", "validate_assignment": True}


class LoraSection(_Section):
    method: Literal["dora", "lora", "full"] = Field(
        "dora", description="dora / lora (peft adapters merged into the base after each stage) or full fine-tuning")
    r: int = Field(8, ge=1, le=65536, description="adapter rank")
    alpha: float = Field(64.0, gt=0, le=1e6, allow_inf_nan=False, description="adapter scaling alpha")
    dropout: float = Field(0.05, ge=0, lt=1, description="adapter dropout")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        description="module names given adapters (LLM projections and the vision tower's qkv, fc1, fc2)")
    train_vision: bool = Field(True, description="also adapt/train the vision tower (its qkv, fc1, fc2)")


class StageSection(_Section):
    """Settings shared by every stage."""

    data: str = Field("mix", description="dataset directory under --data (or an absolute path)")
    steps: int = Field(2000, ge=0, le=MAX_STEPS, description="optimizer steps (0: derive from epochs)")
    epochs: float | None = Field(None, gt=0, le=1e6, allow_inf_nan=False, description="epochs over the data; used when steps is 0")
    batch_size: int = Field(64, ge=1, description="global batch (samples per optimizer step, all ranks)")
    micro_batch_size: int = Field(8, ge=1, description="samples per forward chunk on one rank (accumulation / GradCache chunk)")
    lr: float = Field(2e-5, gt=0, le=10, allow_inf_nan=False, description="peak learning rate")
    schedule: Literal["linear", "cosine", "constant"] = Field("linear", description="lr schedule after warmup")
    warmup_ratio: float = Field(0.05, ge=0, le=1, description="share of steps with linear warmup")
    weight_decay: float = Field(0.0, ge=0, le=10, allow_inf_nan=False, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, ge=0, allow_inf_nan=False, description="gradient clipping (0: off)")
    max_length: int = Field(1024, ge=8, le=10_000_000, description="maximum sequence length in tokens (image tokens included)")
    image_min_pixels: int | None = Field(None, ge=1, le=10**10, description="smallest image area in pixels (default: the processor's)")
    image_max_pixels: int | None = Field(None, ge=1, le=10**10, description="largest image area in pixels (default: the processor's)")
    attention_backend: Literal["sdpa", "eager", "flex"] = Field(
        "sdpa", description="attention kernel: sdpa/eager with dense 4D masks, flex (CUDA) with block masks")
    group_by_length: bool = Field(True, description="length-grouped batching to limit padding")
    save_every: int = Field(500, ge=0, le=MAX_STEPS, description="checkpoint every N steps (0: only at the end)")


class Stage1Section(StageSection):
    text_mask_ratio: float = Field(0.2, ge=0, le=1, description="share of caption tokens masked (MNTP)")
    image_mask_ratio: float = Field(0.5, ge=0, le=1, description="share of image merge units masked (MAE)")
    mae_weight: float = Field(0.5, ge=0, le=1e6, allow_inf_nan=False, description="lambda: loss = MNTP + lambda * MAE")
    mask_fill: Literal["noise", "zero", "mean"] = Field("noise", description="what masked image patches are replaced with")
    norm_pix_loss: bool = Field(False, description="regress per-patch normalised pixels")


class Stage2Section(StageSection):
    b_mask_ratio: float = Field(0.7, ge=0, le=1, description="share of block-B tokens masked")
    mask_variant: Literal["paper", "strict"] = Field(
        "paper", description="collaborative mask: paper (EOS sees everything) or strict (EOS sees only A)")


class Stage3Section(StageSection):
    data: str = Field("original", description="dataset directory under --data (or an absolute path)")
    batch_size: int = Field(1024, ge=1, description="global contrastive batch (in-batch negatives, all ranks)")
    micro_batch_size: int = Field(32, ge=1, description="GradCache chunk: samples per forward on one rank")
    temperature: float = Field(0.02, gt=0, le=1e6, allow_inf_nan=False, description="InfoNCE temperature")
    attention: Literal["bidirectional", "causal"] = Field("bidirectional", description="attention for embedding")
    hard_negatives: bool = Field(True, description="use neg_text/neg_image when the records have them")
    grad_cache: bool = Field(True, description="GradCache (chunked) instead of one full-batch forward")


class TrainConfig(Config):
    """Settings of ``cocoa-train``."""

    data: Path = Field(Path("shards"), description="workspace holding mix/ (stages 1-2) and original/ (stage 3)")
    model: str | None = Field(
        None, description="base model: a local directory or hub id (default: the embedded, generatively pre-trained tiny Qwen2-VL)")
    out: Path = Field(Path("runs/cocoa"), description="run directory (checkpoints, metrics, stage{k}/model)")
    stages: str = Field("1,2,3", description="ordered subset of 1,2,3 to run")
    preset: Literal["auto", "paper", "tiny"] = Field(
        "auto", description="defaults to start from: paper (2B/7B on GPUs), tiny (the offline tiny model on CPU), "
                            "auto (tiny when no --model is given)")
    resume: str = Field("auto", description="auto (latest complete checkpoint), never (refuse existing runs), or a checkpoint dir")
    overwrite: bool = Field(False, description="delete an existing run directory first")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="random seed (data order, masks, init), 0..4294967295")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="multi-process strategy: auto = DDP for adapters, FSDP2 for full fine-tuning on CUDA")
    eos_token: str | None = Field(None, description="EOS token pooled for the embedding (default: the model's cocoa.json or <|endoftext|>)")
    mask_token: str | None = Field(None, description="mask token (default: <|mask|>)")
    num_workers: int = Field(0, ge=0, le=1024, description="DataLoader worker processes per rank")
    log_every: int = Field(1, ge=1, le=MAX_STEPS, description="write a metrics line every N steps")
    keep_checkpoints: int = Field(2, ge=1, le=1_000_000, description="complete checkpoints kept per stage")
    tensorboard: bool = Field(False, description="also write TensorBoard event files under OUT/tensorboard")
    progress: bool = Field(True, description="progress: a live bar on a terminal, plain periodic lines in logs and pipes")
    on_bad_row: Literal["raise", "skip"] = Field(
        "raise", description="a row whose image cannot be read: raise (stop, naming dataset, row and file) or skip "
                             "(counted in metrics.jsonl and the stage summary)")
    lora: LoraSection = Field(default_factory=LoraSection)
    stage1: Stage1Section = Field(default_factory=Stage1Section)
    stage2: Stage2Section = Field(default_factory=Stage2Section)
    stage3: Stage3Section = Field(default_factory=Stage3Section)

    @field_validator("stages", mode="before")
    @classmethod
    def _v_stages(cls, v: Any) -> str:
        return ",".join(str(s) for s in parse_stages(v))

    @model_validator(mode="after")
    def _v_batches(self) -> "TrainConfig":
        for k in ALL_STAGES:
            s = self.stage(k)
            if s.micro_batch_size > s.batch_size:
                # a micro batch larger than the global batch is never useful; clamp silently-documented
                object.__setattr__(s, "micro_batch_size", s.batch_size)
        return self

    @property
    def stage_list(self) -> list[int]:
        return parse_stages(self.stages)

    def stage(self, k: int) -> StageSection:
        return getattr(self, f"stage{k}")


# ---------------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------------
# Pixel budgets of the paper preset: the hub processors of Qwen2-VL / Qwen2.5-VL allow 12,845,056 pixels (16,384
# image tokens), which no max length of the recipe holds (preflight refused `--preset paper --model
# Qwen/Qwen2-VL-2B-Instruct`). Stages 1-2 at the authors' 448 px (256 tokens), stage 3 at MMEB's evaluation
# budget, 672 px (576 tokens), which cocoa.json then carries to evaluation.
PAPER_PIXELS = {1: 448 * 448, 2: 448 * 448, 3: 672 * 672}
_TINY_STAGE = {"steps": 100, "batch_size": 16, "micro_batch_size": 16, "lr": 1e-4, "warmup_ratio": 0.1,
               "max_grad_norm": 1.0, "max_length": 256, "save_every": 50}
# The tiny preset follows the CPU miniature: full fine-tuning; stage 3 at lr 3e-4, tau 0.05, batch 64 (it learns;
# lr 1e-3 without clipping does not; lr 3e-4 won the baseline's sweep in docs/results.md). Stages 1-2 are what
# that experiment's configuration sweep chose on validation (bench/ablation.py, 2026-12-02): 200 steps of 16 each
# at a constant lr after 5 % warm-up, stage 1 at 1e-4 with the authors' MAE ratio 0.3, stage 2 at 3e-4 with the
# strict mask (it beat the paper mask and DoRA on validation, 27.2 vs 26.4 vs 23.4 %). The earlier gentle stage
# 2 (lr 3e-5 with decay) moved the weights too little to do anything (issue 14's audit).
_TINY_PRE = dict(_TINY_STAGE, steps=200, schedule="constant", warmup_ratio=0.05, save_every=100)
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {f"stage{k}": {"image_max_pixels": px} for k, px in PAPER_PIXELS.items()},
    "tiny": {
        "lora": {"method": "full"},
        "stage1": dict(_TINY_PRE, lr=1e-4, image_mask_ratio=0.3),
        "stage2": dict(_TINY_PRE, lr=3e-4, mask_variant="strict"),
        "stage3": dict(_TINY_STAGE, steps=200, lr=3e-4, batch_size=64, micro_batch_size=32, temperature=0.05),
    },
}


def explicit_settings(config: BaseModel) -> dict[str, Any]:
    """The settings a user gave (YAML or flags), nested; defaults left out."""
    return config.model_dump(exclude_unset=True, mode="python")


def resolve_preset(config: TrainConfig) -> TrainConfig:
    """Apply the preset under the explicitly given settings (defaults < preset < YAML < flags)."""
    preset = config.preset
    if preset == "auto":
        preset = "tiny" if config.model is None else "paper"
    given = explicit_settings(config)
    merged = _deep_merge(_copy(PRESETS[preset]), given)
    merged["preset"] = preset
    cfg = TrainConfig.build(merged, where="preset " + preset)
    return cfg


def _copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in d.items()}


__all__ = ["TrainConfig", "LoraSection", "StageSection", "Stage1Section", "Stage2Section", "Stage3Section",
           "PRESETS", "PAPER_PIXELS", "resolve_preset", "explicit_settings", "parse_stages", "ConfigError", "DEFAULT_TARGETS"]
