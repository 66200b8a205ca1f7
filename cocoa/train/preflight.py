"""Preflight: everything a run checks before any model weights load -- each stage's dataset (manifest,
record type, completeness, every shard's sha256, rows marked for the stage, batch size), the model (a
Qwen2-VL-like config, a tokenizer with the EOS and mask tokens, lengths that hold one image) and the
embedded default model. :func:`validate` turns a config into a :class:`Plan`, or raises :class:`TrainError`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import TrainConfig
from ..errors import CocoaError

QWEN_TYPES = ("qwen2_vl", "qwen2_5_vl")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class TrainError(CocoaError):
    """The run cannot start or continue; the message says what is wrong and how to fix it."""


@dataclass
class StagePlan:
    stage: int
    data: Path
    record_type: str
    input_model: str  # path or hub id; "" = previous stage's output (resolved when it exists)
    dir: Path


@dataclass
class Plan:
    config: TrainConfig
    model: str
    model_note: str
    stages: list[StagePlan] = field(default_factory=list)


def default_model_dir(console: Any = None) -> tuple[str, str]:
    """The embedded default: the generatively pre-trained tiny model (built once, cached), else -- when
    pre-training is unavailable -- the random-init tiny model, with a clear note."""
    try:
        from ..tiny.pretrain import pretrained_tiny_dir
    except ImportError as e:
        reason = f"cocoa.tiny.pretrain is unavailable ({e})"
    else:
        try:
            return (str(pretrained_tiny_dir(console=console)),
                    "the embedded tiny Qwen2-VL, generatively pre-trained on scenes captions (cached; pass --model "
                    "for a real backbone)")
        except CocoaError as e:
            reason = f"pre-training the tiny model failed ({e})"
    from ..tiny.build import tiny_model_dir

    return (str(tiny_model_dir()),
            f"the embedded tiny Qwen2-VL at RANDOM init: {reason}; embeddings will be weak -- pass --model "
            "for a real backbone")


def _stage_data(config: TrainConfig, k: int) -> Path:
    d = Path(config.stage(k).data)
    return d if d.is_absolute() else Path(config.data) / d


def validate(config: TrainConfig, *, resolve_default: bool = True) -> Plan:
    """Check stages, data, model, tokenizer and lengths; raise a clear error before any compute."""
    stages = config.stage_list  # already validated by the config
    # -- data -------------------------------------------------------------------------------------
    from ..shards import MANIFEST, read_manifest

    plans: list[StagePlan] = []
    verified: dict[Path, Any] = {}
    too_small: list[str] = []
    for k in stages:
        d = _stage_data(config, k)
        want = "PairRecord" if k == 3 else "MixRecord"
        if not (d / MANIFEST).is_file():
            hint = ("build it with `cocoa-data mix --ratio 1:1` (or point --stage{k}-data at another dataset)"
                    if want == "MixRecord" else
                    "build it with `cocoa-data scenes` / an MMEB import (or point --stage3-data elsewhere)")
            raise TrainError(
                f"stage {k} reads {want}s from {d}, which is missing (no {MANIFEST}); " + hint.format(k=k))
        m = read_manifest(d)
        if m.record_type not in ("MixRecord", "PairRecord") or (k == 3 and m.record_type != "PairRecord"):
            raise TrainError(f"stage {k} needs {want}s but {d} holds {m.record_type}s; point --stage{k}-data at "
                             f"a {want} dataset")
        if not m.complete:
            raise TrainError(f"{d} is incomplete (its writer was interrupted); rerun the command that made it")
        if m.num_rows == 0:
            raise TrainError(f"{d} holds no records; rebuild it")
        # Every shard is checked in full here, before any compute: size, row counts, columns and its sha256
        # (a flipped byte is refused, never trained on). The sha256 costs ~1.7 s per GB of shards, against minutes
        # to hours of training (docs/training.md).
        from .data import ArrowRecords, batch_too_large

        records = verified.get(d)
        if records is None:
            records = verified[d] = ArrowRecords(d, verify=True)
        n = _stage_rows(records, k) if records.record_type == "MixRecord" else len(records)
        if n == 0:
            raise TrainError(f"{d}: no record is marked for stage {k} (column 'stages'); rebuild the mixture with "
                             f"stage {k} included, or point --stage{k}-data elsewhere")
        bs = config.stage(k).batch_size
        if n < bs and not too_small:  # reported after the model checks (a wrong model is the first thing to fix)
            too_small.append(batch_too_large(k, str(d) if k == 3 else f"{d} (rows marked for stage {k})", n, bs))
        plans.append(StagePlan(k, d, m.record_type, "", Path(config.out) / f"stage{k}"))
    # -- model ------------------------------------------------------------------------------------
    note = ""
    model = config.model
    if model is None:
        if not resolve_default:
            raise TrainError("no --model given")
        model, note = default_model_dir()
    check_model(model, config)
    if too_small:
        raise TrainError(too_small[0])
    return Plan(config=config, model=model, model_note=note, stages=plans)


def _stage_rows(records: Any, k: int) -> int:
    """Rows of a MixRecord dataset marked for stage ``k`` (0 when none)."""
    stages = records._column("stages").to_pylist()
    return sum(1 for v in stages if k in (v or []))


def _load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except Exception as e:
        raise TrainError(f"{path} is not valid JSON ({e}); the model directory is damaged") from None


def check_model(model: str, config: TrainConfig) -> None:
    """The model must be a Qwen2-VL / Qwen2.5-VL with a tokenizer that has the EOS (and mask) token and
    every stage's max length must hold one image."""
    p = Path(model)
    if p.exists():
        if not p.is_dir():
            raise TrainError(f"--model {model} is a file; give a model directory (config.json, weights, processor)")
        cfg_file = p / "config.json"
        if not cfg_file.is_file():
            raise TrainError(f"--model {model} has no config.json: it is not a transformers model directory "
                             "(expected a Qwen2-VL / Qwen2.5-VL checkpoint saved with save_pretrained)")
        cfg = _load_json(cfg_file)
        if not isinstance(cfg, dict):
            raise TrainError(f"--model {model}: {cfg_file} holds a {type(cfg).__name__}, not a model config "
                             "(a JSON object); the model directory is damaged: re-download or rebuild it")
        spec_file = p / "cocoa.json"
        spec = _load_json(spec_file) if spec_file.is_file() else {}
        if not isinstance(spec, dict):
            raise TrainError(f"--model {model}: {spec_file} holds a {type(spec).__name__}, not cocoa's embedding "
                             "spec (a JSON object); the model directory is damaged: re-download or rebuild it")
    else:
        if "/" not in model or model.startswith((".", "/", "~")):
            raise TrainError(f"--model {model}: no such directory (and not a hub id such as Qwen/Qwen2-VL-2B-Instruct)")
        try:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(model).to_dict()
        except Exception as e:
            raise TrainError(f"--model {model}: cannot load its config from the hub or cache ({type(e).__name__}: "
                             f"{str(e)[:200]}); download it first or pass a local directory") from None
        spec = {}
    for sub in ("text_config", "vision_config"):
        if cfg.get(sub) is not None and not isinstance(cfg.get(sub), dict):
            raise TrainError(f"--model {model}: config.json's {sub!r} is a {type(cfg[sub]).__name__}, not a mapping; "
                             "the model directory is damaged: re-download or rebuild it")
    mtype = cfg.get("model_type", "")
    if mtype not in QWEN_TYPES:
        raise TrainError(
            f"--model {model} is a {mtype or 'model of unknown type'!r}, not Qwen2-VL-like: cocoa trains "
            f"Qwen2-VL / Qwen2.5-VL (model_type {' or '.join(QWEN_TYPES)})")
    if p.exists() and not any((p / w).is_file() for w in _WEIGHT_FILES):
        raise TrainError(f"--model {model} has no weights ({' or '.join(_WEIGHT_FILES[:2])}): the model directory "
                         "is incomplete; re-download or rebuild it")
    # -- tokenizer ----------------------------------------------------------------------------------
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
    except Exception as e:
        raise TrainError(f"--model {model}: its tokenizer cannot be loaded ({type(e).__name__}: {str(e)[:200]})") from None
    eos = config.eos_token or spec.get("eos_token") or "<|endoftext|>"
    mask = config.mask_token or spec.get("mask_token") or "<|mask|>"
    vocab = tok.get_vocab()
    if eos not in vocab:
        raise TrainError(f"the tokenizer of {model} has no EOS token {eos!r}; pass --eos-token with a token it has "
                         "(Qwen: <|endoftext|>)")
    text_cfg = cfg.get("text_config") or cfg
    n_embed = int(text_cfg.get("vocab_size") or cfg.get("vocab_size") or 0)
    if mask in vocab and n_embed:
        from ..model.wrapper import vocab_mismatch

        msg = vocab_mismatch(len(tok), max(vocab.values()), n_embed, f"--model {model}")
        if msg:
            raise TrainError(msg)
    if mask not in vocab and len(tok) >= n_embed:
        raise TrainError(
            f"the tokenizer of {model} has no mask token {mask!r} and the embedding matrix ({n_embed} rows) has no "
            f"free row to add it; pass --mask-token with a token the tokenizer has, or use a tokenizer with {mask}")
    # -- lengths vs one image -------------------------------------------------------------------------
    vcfg = cfg.get("vision_config") or {}
    patch = int(vcfg.get("patch_size") or 14)
    merge = int(vcfg.get("spatial_merge_size") or 2)
    proc_max = _processor_max_pixels(p) if p.exists() else None
    for k in config.stage_list:
        s = config.stage(k)
        max_px = s.image_max_pixels or spec.get("image_max_pixels") or proc_max
        if not max_px:
            continue
        tokens = math.ceil(max_px / (patch * merge) ** 2)
        need = tokens + 3  # vision start/end + EOS
        if s.max_length < need:
            raise TrainError(
                f"--stage{k}-max-length {s.max_length} is too small for one image: an image of up to {max_px} pixels "
                f"takes {tokens} image tokens + 2 vision markers + EOS = {need}; raise --stage{k}-max-length or "
                f"lower --stage{k}-image-max-pixels")


def _processor_max_pixels(p: Path) -> int | None:
    for name in ("preprocessor_config.json", "processor_config.json"):
        f = p / name
        if f.is_file():
            d = _load_json(f)
            d = d.get("image_processor", d)
            size = d.get("size") or {}
            v = d.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels")
            if v:
                return int(v)
    return None


__all__ = ["TrainError", "Plan", "StagePlan", "validate", "check_model", "default_model_dir", "QWEN_TYPES"]
