"""``cocoa.json``: how a saved model embeds, written next to every model cocoa saves.

Training writes it; the evaluator and :class:`cocoa.Embedder` read it, so evaluation pools exactly
as training did (EOS token and id, attention mode, normalisation, image resolution).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..records import RecordError

SPEC_FILE = "cocoa.json"


class EmbeddingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["cocoa-model"] = "cocoa-model"
    version: int = 1
    arch: Literal["qwen2-vl", "qwen2.5-vl"] = "qwen2-vl"
    pooling: Literal["eos", "last", "mean"] = "eos"
    eos_token: str = "<|endoftext|>"
    eos_token_id: int | None = None
    mask_token: str = "<|mask|>"
    mask_token_id: int | None = None
    attention: Literal["bidirectional", "causal"] = "bidirectional"
    normalize: bool = True
    image_min_pixels: int | None = None
    image_max_pixels: int | None = None
    max_length: int = 1024
    stages: list[int] = Field(default_factory=list, description="CoCoA stages this model went through")
    base_model: str = ""
    extra: dict = Field(default_factory=dict)

    def save(self, model_dir: str | Path) -> Path:
        from ..shards import atomic_write_json

        path = Path(model_dir) / SPEC_FILE
        atomic_write_json(path, self.model_dump())
        return path

    @classmethod
    def load(cls, model_dir: str | Path) -> "EmbeddingSpec":
        path = Path(model_dir) / SPEC_FILE
        if not path.is_file():
            raise RecordError(
                f"{model_dir} has no {SPEC_FILE}: cocoa does not know how this model pools its embedding. "
                "Use a model saved by `cocoa-train`, or pass --pooling (and --eos-token) explicitly"
            )
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except Exception as e:
            raise RecordError(f"{path} is invalid ({e}); re-save the model with cocoa-train") from None
