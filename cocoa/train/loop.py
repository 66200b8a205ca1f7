"""``run_training(config)``: the CoCoA stages chained, resumable, on one process or many.

For each selected stage k (in order) the loop

1. loads the stage's input model -- stage k-1's saved ``OUT/stage{k-1}/model`` when that stage ran in
   this run, else ``--model`` -- through :class:`cocoa.model.wrapper.CocoaModel`;
2. adds LoRA/DoRA adapters (peft) or trains every weight; wraps it in DDP / FSDP2 under torchrun;
3. streams deterministic, length-grouped global batches from memory-mapped Arrow shards, each rank taking
   its slice, collated by the method's ``Stage1Collator`` / ``Stage2Collator`` / ``EmbedCollator``;
4. steps AdamW with warmup + linear/cosine decay; stages 1-2 accumulate micro batches, stage 3 runs
   GradCache over the global contrastive batch (embeddings gathered across ranks);
5. checkpoints atomically every ``save_every`` steps and at the end (``--resume auto`` continues from the
   latest complete one), logs ``OUT/metrics.jsonl`` (+ TensorBoard), shows a rich progress bar;
6. merges the adapters and saves ``OUT/stage{k}/model`` (safetensors + processor + ``cocoa.json``),
   and draws ``OUT/stage{k}/loss.png``.

Every input is validated before any model weights are loaded (:func:`validate`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import TrainConfig, resolve_preset
from ..errors import CocoaError

QWEN_TYPES = ("qwen2_vl", "qwen2_5_vl")
METRICS = "metrics.jsonl"
TRUNCATION_WARN = 0.05  # warn when more than this share of a stage's samples is cut to --stageK-max-length


class TrainError(CocoaError):
    """The run cannot start or continue; the message says what is wrong and how to fix it."""


# ---------------------------------------------------------------------------------------------------
# planning and validation (no model weights loaded here)
# ---------------------------------------------------------------------------------------------------
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
        spec_file = p / "cocoa.json"
        spec = _load_json(spec_file) if spec_file.is_file() else {}
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
    mtype = cfg.get("model_type", "")
    if mtype not in QWEN_TYPES:
        raise TrainError(
            f"--model {model} is a {mtype or 'model of unknown type'!r}, not Qwen2-VL-like: cocoa trains "
            f"Qwen2-VL / Qwen2.5-VL (model_type {' or '.join(QWEN_TYPES)})")
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


# ---------------------------------------------------------------------------------------------------
# run directory
# ---------------------------------------------------------------------------------------------------
def _stage_done(stage_dir: Path) -> bool:
    m = stage_dir / "model"
    return (m / "cocoa.json").is_file() and (m / "config.json").is_file()


# Settings that never change what a finished step computed: a rerun may change them freely.
_FREE = ("resume", "overwrite", "progress", "tensorboard", "num_workers", "log_every", "stages", "keep_checkpoints",
         "on_bad_row", "preset")  # the preset is resolved into the values compared below
_FREE_STAGE = ("save_every",)
_STAGE_KEYS = tuple(f"stage{k}" for k in (1, 2, 3))


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def run_settings(config: TrainConfig, stages: Any = (1, 2, 3)) -> dict[str, Any]:
    """The settings that decide what stages ``stages`` compute, flattened (``stage3.batch_size``, ``lora.r``).

    Run-wide settings (model, data, seed, lora, precision, tokens, ...) count for every stage; a stage's own
    section counts only for that stage. Display-only and bookkeeping settings (:data:`_FREE`) never count."""
    d = config.model_dump(mode="json")
    flat: dict[str, Any] = {}
    for key, v in d.items():
        if key in _FREE or key in _STAGE_KEYS:
            continue
        flat.update(_flat(v, f"{key}."))
    for k in stages:
        for key, v in d[f"stage{k}"].items():
            if key not in _FREE_STAGE:
                flat[f"stage{k}.{key}"] = v
    return flat


def _config_hash(config: TrainConfig, stages: Any = (1, 2, 3)) -> str:
    return hashlib.sha256(json.dumps(run_settings(config, stages), sort_keys=True).encode()).hexdigest()[:16]


def settings_diff(old: TrainConfig, new: TrainConfig, stages: Any) -> list[tuple[str, Any, Any]]:
    """``[("stage1.lr", 0.0001, 0.001), ...]``: the settings of ``stages`` that differ between two configs."""
    a, b = run_settings(old, stages), run_settings(new, stages)
    return [(key, a.get(key), b.get(key)) for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def _flag(key: str) -> str:
    """``stage3.batch_size`` -> ``--stage3-batch-size``; ``lora.r`` -> ``--lora-r``."""
    return "--" + key.replace(".", "-").replace("_", "-")


def started_stages(out: Path) -> list[int]:
    """Stages of the run in ``out`` that saved anything (a checkpoint or their model)."""
    return [k for k in (1, 2, 3) if (out / f"stage{k}").is_dir() and any((out / f"stage{k}").iterdir())]


def _is_cocoa_run(out: Path) -> bool:
    """``out`` carries the run marker, or (runs made before the marker existed) cocoa-train's config.yaml."""
    from ..fs import MARKER

    marker = out / MARKER
    if marker.is_file():
        try:
            return json.loads(marker.read_bytes()).get("kind") == "run"
        except (ValueError, OSError, AttributeError):
            return False
    prev = out / "config.yaml"
    if prev.is_file() and not (out / "manifest.json").exists():
        try:
            TrainConfig.from_yaml(prev)
            return True
        except CocoaError:
            return False
    return False


def check_out_dir(config: TrainConfig) -> None:
    """Refuse an ``--out`` that cocoa-train must neither write into nor delete, before anything is created
    in it: a file, or a non-empty directory that is not a cocoa run (a workspace, a dataset, your files)."""
    from ..fs import has_content

    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file; give a directory for the run")
    if out.is_symlink() and config.overwrite:
        raise TrainError(f"--out {out} is a symbolic link; --overwrite will not delete through it. Give the real "
                         "directory or another --out")
    if has_content(out) and not _is_cocoa_run(out):
        raise TrainError(
            f"--out {out} is not empty and is not a cocoa-train run directory (no run marker, no cocoa-train "
            f"config.yaml); cocoa-train will not write into it{' or delete it (--overwrite)' if config.overwrite else ''}."
            " Choose a new or empty directory for --out")
    if config.overwrite and has_content(out):
        from ..fs import MARKER, check_removable, mark_owned

        if not (out / MARKER).exists():
            mark_owned(out, "run")  # a run made before the marker existed (its config.yaml is cocoa-train's)
        check_removable(out)  # never the working directory, its parents or home, whatever they hold


def prepare_run_dir(config: TrainConfig, is_main: bool) -> None:
    """Rank 0, holding the run lock: apply --overwrite (only to a cocoa run), mark the directory as a run,
    refuse a rerun whose settings differ for a stage that already started (naming them), save config.yaml."""
    from ..fs import has_content, mark_owned, remove_owned_tree
    from ..shards import atomic_write_text

    out = Path(config.out)
    if not is_main:
        return
    check_out_dir(config)
    if config.overwrite and has_content(out):
        remove_owned_tree(out, keep_lock=True)
    mark_owned(out, "run")
    existing = has_content(out)
    if existing and config.resume == "never":
        raise TrainError(f"{out} already holds a run; pass --resume auto to continue it, --overwrite to start "
                         "over, or choose another --out")
    prev = out / "config.yaml"
    if existing and prev.is_file():
        old = TrainConfig.from_yaml(prev)
        started = started_stages(out)
        diff = settings_diff(old, config, started) if started else []
        if diff:
            shown = "; ".join(f"{_flag(key)} was {a!r}, now {b!r}" for key, a, b in diff[:8])
            more = f" (and {len(diff) - 8} more)" if len(diff) > 8 else ""
            raise TrainError(
                f"{out} was started with other settings for stage{'s' if len(started) > 1 else ''} "
                f"{','.join(map(str, started))} (already started): {shown}{more}. Resuming with different ones would "
                "mix runs: use the run's settings (they are in " + str(prev) + "), --overwrite to start over, or "
                "another --out. Settings of stages that have not started may change")
    atomic_write_text(out / "config.yaml", config.to_yaml())


# ---------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------
class Metrics:
    """JSONL always (``OUT/metrics.jsonl``); TensorBoard when asked. Rank 0 only."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool) -> None:
        self.path = Path(out) / METRICS
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out) / "tensorboard"))
            except ImportError as e:
                raise TrainError(f"--tensorboard needs the tensorboard package ({e}); pip install tensorboard") from None

    def truncate(self, stage: int, step: int) -> None:
        """Drop lines written after checkpoint ``step`` of ``stage`` (a resumed run rewrites them)."""
        if not (self.enabled and self.path.is_file()):
            return
        from ..shards import atomic_write_text

        keep = []
        for line in self.path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if r.get("stage", 0) < stage or (r.get("stage") == stage and r.get("step", 0) <= step):
                keep.append(line)
        atomic_write_text(self.path, "".join(x + "\n" for x in keep))

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        if self.tb is not None:
            k = row["stage"]
            for key, v in row.items():
                if isinstance(v, (int, float)) and key not in ("stage", "step"):
                    self.tb.add_scalar(f"stage{k}/{key}", v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(out: str | Path, stage: int | None = None) -> list[dict[str, Any]]:
    p = Path(out) / METRICS
    rows = []
    if p.is_file():
        for line in p.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if stage is None or r.get("stage") == stage:
                rows.append(r)
    return rows


def plot_loss(out: Path, stage: int, dest: Path) -> Path | None:
    rows = [r for r in read_metrics(out, stage) if "loss" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2, label="loss")
    for part in sorted({k for r in rows for k in r if k.startswith("loss_")}):
        ax.plot([r["step"] for r in rows if part in r], [r[part] for r in rows if part in r], lw=0.8, label=part)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"CoCoA stage {stage}")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = dest.parent / f".{dest.name}.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, dest)
    return dest


# ---------------------------------------------------------------------------------------------------
# the method, behind a thin adapter (cocoa.model.wrapper / collate / objectives)
# ---------------------------------------------------------------------------------------------------
def _load_cocoa_model(path: str, config: TrainConfig, k: int, device: Any, dtype: Any) -> Any:
    from ..model.wrapper import CocoaModel
    from ..model.spec import SPEC_FILE, EmbeddingSpec

    s = config.stage(k)
    impl = {"sdpa": "sdpa", "eager": "eager", "flex": "cocoa_flex"}[s.attention_backend]
    spec = None
    over: dict[str, Any] = {}
    if config.eos_token:
        over.update(eos_token=config.eos_token, eos_token_id=None)
    if config.mask_token:
        over.update(mask_token=config.mask_token, mask_token_id=None)
    if over:
        base = EmbeddingSpec.load(path) if (Path(path) / SPEC_FILE).is_file() else EmbeddingSpec()
        spec = base.model_copy(update=over)
    model = CocoaModel.from_pretrained(path, spec=spec, attn_implementation=impl, load_image_decoder=(k == 1),
                                       dtype=dtype)
    if s.image_min_pixels or s.image_max_pixels:
        _set_pixels(model.processor, s.image_min_pixels, s.image_max_pixels)
    upd: dict[str, Any] = {"max_length": s.max_length}
    if s.image_min_pixels:
        upd["image_min_pixels"] = s.image_min_pixels
    if s.image_max_pixels:
        upd["image_max_pixels"] = s.image_max_pixels
    if k == 3:
        upd["attention"] = config.stage3.attention  # evaluation pools exactly as stage 3 trained
    model.spec = model.spec.model_copy(update=upd)
    if k == 1:
        model.ensure_image_decoder()  # before adapters are injected (it copies a plain LLM layer)
    return model.to(device)


def _stage_call(config: TrainConfig, k: int) -> tuple[str, dict[str, Any]]:
    """The CocoaModel method and keyword arguments computing stage ``k``'s loss (stages 1-2)."""
    if k == 1:
        return "stage1_loss", {"mae_weight": config.stage1.mae_weight, "norm_pix": config.stage1.norm_pix_loss}
    return "stage2_loss", {"variant": config.stage2.mask_variant}


def _set_pixels(processor: Any, lo: int | None, hi: int | None) -> None:
    ip = processor.image_processor
    size = dict(getattr(ip, "size", None) or {})
    if lo:
        ip.min_pixels = lo
        size["shortest_edge"] = lo
    if hi:
        ip.max_pixels = hi
        size["longest_edge"] = hi
    if size:
        ip.size = size


def _make_collators(model: Any, config: TrainConfig, k: int, data_root: Path, seed: int) -> Any:
    from ..model.collate import EmbedCollator, Stage1Collator, Stage2Collator

    s = config.stage(k)
    if k == 1:
        return Stage1Collator(model.processor, model.spec, text_mask_ratio=config.stage1.text_mask_ratio,
                              image_mask_ratio=config.stage1.image_mask_ratio, image_mask_mode=config.stage1.mask_fill,
                              max_length=s.max_length, image_root=data_root, seed=seed)
    if k == 2:
        return Stage2Collator(model.processor, model.spec, b_mask_ratio=config.stage2.b_mask_ratio,
                              max_length=s.max_length, image_root=data_root, seed=seed)
    return EmbedCollator(model.processor, model.spec, max_length=s.max_length, image_root=data_root)


def _as_loss(out: Any) -> tuple[Any, dict[str, float]]:
    """``(loss, metrics)`` from a CocoaModel stage loss; metric names: ``loss_<part>``, ``acc``, ``n_*``."""
    loss, parts = (out[0], out[1]) if isinstance(out, tuple) else (out, {})
    clean: dict[str, float] = {}
    for key, v in (parts or {}).items():
        if key == "loss":
            continue
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        clean[key if key == "acc" or key.startswith(("n_", "loss_")) else f"loss_{key}"] = v
    return loss, clean


# ---------------------------------------------------------------------------------------------------
# a dispatch module, so DDP sees every forward (its reducer hooks need forward to go through it)
# ---------------------------------------------------------------------------------------------------
def _dispatch_module(inner: Any) -> Any:
    import torch

    class Dispatch(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.inner = m

        def forward(self, method: str, *args: Any, **kw: Any) -> Any:
            return getattr(self.inner, method)(*args, **kw)

    return Dispatch(inner)


# ---------------------------------------------------------------------------------------------------
# data per step
# ---------------------------------------------------------------------------------------------------
def _step_seed(seed: int, k: int, step: int, rank: int, micro: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{k}:{step}:{rank}:{micro}".encode()).digest()[:7], "little")


class BadRowError(TrainError):
    """A training row whose image cannot be read (``--on-bad-row raise``); ``reason`` is the short form."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


_IMAGE_FIELDS = {"MixRecord": ("image",), "PairRecord": ("qry_image", "pos_image", "neg_image")}
_SKIP_HINT = (". Fix or remove the row, or pass --on-bad-row skip to skip such rows (they are counted in "
              "metrics.jsonl and the stage summary)")


class StepBatches:
    """Map-style dataset: item ``j`` = the collated inputs of one micro batch (stages 1-2) or of one step
    (stage 3: query / target / negative chunks). Deterministic in (seed, stage, step, rank), so it runs in
    DataLoader workers and resumes exactly.

    Images are decoded here, row by row, so a bad one is named (dataset file, row, record id, field):
    ``on_bad_row="raise"`` stops with that name, ``"skip"`` drops the row (stage 3 under several processes
    swaps in the next readable row instead, so every rank keeps the same batch size). Each item reports its
    skipped rows and the collator's truncation / rejection counts (they travel back from DataLoader workers)."""

    def __init__(self, records: Any, stream: Any, collator: Any, k: int, start: int, end: int, rank: int,
                 world: int, micro: int, seed: int, hard_negatives: bool, on_bad_row: str = "raise") -> None:
        self.records, self.stream, self.collator = records, stream, collator
        self.k, self.start, self.end = k, start, end
        self.rank, self.world, self.micro, self.seed = rank, world, micro, seed
        self.per_rank = stream.batch_size // world
        self.n_micro = 1 if k == 3 else math.ceil(self.per_rank / micro)
        self.hard_negatives = hard_negatives
        self.on_bad_row = on_bad_row

    def __len__(self) -> int:
        return max(0, self.end - self.start) * self.n_micro

    def _where(self, i: int) -> str:
        where = getattr(self.records, "where", None)
        return where(i) if where is not None else f"row {i}"

    def load(self, i: int) -> Any:
        """Record ``i`` with its images decoded (PIL), or :class:`BadRowError` naming the row."""
        from ..model.collate import load_image

        try:
            rec = self.records[i]
        except CocoaError as e:
            msg = f"stage {self.k}: {self._where(i)} is not a valid record ({e})"
            raise BadRowError(msg + _SKIP_HINT, msg) from None
        root = getattr(self.records, "root", None)
        upd: dict[str, Any] = {}
        for name in _IMAGE_FIELDS.get(type(rec).__name__, ()):
            ref = getattr(rec, name, None)
            if ref is None:
                continue
            try:
                upd[name] = load_image(ref, root)
            except CocoaError as e:
                msg = f"stage {self.k}: {self._where(i)} (record {rec.id}, {name}): {e}"
                raise BadRowError(msg + _SKIP_HINT, msg) from None
        return rec.model_copy(update=upd) if upd else rec

    def _rows(self, idx: list[int], swap: bool) -> tuple[list[Any], list[str]]:
        recs: list[Any] = []
        skipped: list[str] = []
        n = len(self.records)
        for i in idx:
            try:
                recs.append(self.load(i))
                continue
            except BadRowError as e:
                if self.on_bad_row != "skip":
                    raise
                skipped.append(e.reason)
            if swap:  # the next readable row after i (deterministic), so the batch keeps its size
                for d in range(1, min(n, 1000)):
                    try:
                        recs.append(self.load((i + d) % n))
                        break
                    except BadRowError:
                        continue
        return recs, skipped

    def _counts(self, before: dict[str, int]) -> dict[str, int]:
        st = self.collator.stats
        return {key: int(st.get(key, 0)) - before.get(key, 0) for key in ("truncated", "rejected")}

    def __getitem__(self, j: int) -> dict[str, Any]:
        # An error travels back as a value: raised in a DataLoader worker it would come back re-wrapped with
        # the worker's traceback in its message instead of one clean line.
        try:
            return self._item(j)
        except CocoaError as e:
            return {"error": str(e), "step": self.start + j // self.n_micro}

    def _item(self, j: int) -> dict[str, Any]:
        import torch

        from .data import rank_slice

        step = self.start + j // self.n_micro
        m = j % self.n_micro
        idx = rank_slice(self.stream.batch(step), self.rank, self.world)
        before = {key: int(self.collator.stats.get(key, 0)) for key in ("truncated", "rejected")}
        if self.k != 3:
            part = idx[m * self.micro:(m + 1) * self.micro]
            recs, skipped = self._rows(part, swap=False)
            self.collator.generator = torch.Generator().manual_seed(_step_seed(self.seed, self.k, step, self.rank, m))
            batch = self.collator(recs) if recs else None
            return {"step": step, "micro": m, "n_micro": self.n_micro, "batch": batch, "rows": len(part),
                    "samples": len(recs), "skipped": skipped, **self._counts(before)}
        recs, skipped = self._rows(idx, swap=self.world > 1)
        if not recs:
            raise BadRowError(f"stage 3 step {step}: every row of the batch was skipped as unreadable "
                              f"(first: {skipped[0] if skipped else '?'}); fix the dataset")
        chunks = [recs[s:s + self.micro] for s in range(0, len(recs), self.micro)]
        groups = [[self.collator([(r.qry_text, r.qry_image) for r in c]) for c in chunks],
                  [self.collator([(r.pos_text, r.pos_image) for r in c]) for c in chunks]]
        if self.hard_negatives and all((r.neg_text or r.neg_image is not None) for r in recs):
            groups.append([self.collator([(r.neg_text, r.neg_image) for r in c]) for c in chunks])
        return {"step": step, "micro": 0, "n_micro": 1, "groups": groups, "rows": len(idx),
                "samples": len(recs) * len(groups), "skipped": skipped, **self._counts(before)}


def _count_tokens(batch: Any) -> tuple[int, int]:
    from .data import padding_stats

    if batch is None:
        return 0, 0
    return padding_stats(batch)


# ---------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------
def run_training(config: TrainConfig, console: Any = None) -> dict[str, Any]:
    """Run the configured stages; returns ``{"out": ..., "stages": {k: model_dir}, ...}``."""
    import torch

    from . import distributed as D

    config = resolve_preset(config)
    plan = validate(config)  # before any compute
    info = D.init()
    try:
        return _run(plan, info, console)
    finally:
        D.shutdown()


def _run(plan: Plan, info: Any, console: Any) -> dict[str, Any]:
    import torch

    from . import distributed as D

    config = plan.config
    out = Path(config.out)
    con = console
    if con is None and info.is_main:
        from rich.console import Console

        con = Console(stderr=True, highlight=False, soft_wrap=True)  # whole lines in logs, not cut at 80 columns
    say = (lambda *a: con.print(*a)) if (info.is_main and con is not None) else (lambda *a: None)
    err: list[str] = [""]
    lock = ExitStack()
    if info.is_main:
        # One writer per run directory: rank 0 holds an flock on OUT/.cocoa.lock for the whole run (the other
        # ranks of the same job follow rank 0; the kernel drops it when rank 0 dies, SIGKILL included).
        from ..fs import exclusive_lock

        try:
            check_out_dir(config)  # refuse a foreign directory before creating the lock file in it
            lock.enter_context(exclusive_lock(out))
            prepare_run_dir(config, True)
        except CocoaError as e:
            lock.close()
            err[0] = str(e)
    err = D.broadcast_object(err, info)
    if err[0]:
        raise TrainError(err[0])
    with lock:
        return _run_locked(plan, info, console, con, say)


def _run_locked(plan: Plan, info: Any, console: Any, con: Any, say: Any) -> dict[str, Any]:
    config = plan.config
    out = Path(config.out)
    if plan.model_note:
        say(f"[yellow]model:[/yellow] {plan.model_note}")
    say(f"cocoa-train: stages {config.stages} -> {out} (preset {config.preset}, {config.lora.method}, "
        f"{info.world} process{'es' if info.world > 1 else ''} on {info.device.type})")
    metrics = Metrics(out, info.is_main, config.tensorboard)
    results: dict[str, Any] = {"out": str(out), "stages": {}, "summary": {}}
    prev_model: str = plan.model
    try:
        for sp in plan.stages:
            if _stage_done(sp.dir) and config.resume != "never":
                say(f"stage {sp.stage}: already finished ({sp.dir / 'model'}), skipping")
            else:
                summary = _train_stage(sp, prev_model, config, info, metrics, say)
                results["summary"][sp.stage] = summary
            prev_model = str(sp.dir / "model")
            results["stages"][sp.stage] = prev_model
    finally:
        metrics.close()
    return results


def _autocast(device: Any, precision: str) -> Any:
    import torch

    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def _train_stage(sp: StagePlan, input_model: str, config: TrainConfig, info: Any, metrics: Metrics,
                 say: Any) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader

    from . import checkpoint as C
    from . import distributed as D
    from .data import ArrowRecords, BatchStream
    from .lora import apply_adapters, count_parameters, merge_adapters

    k, s = sp.stage, config.stage(sp.stage)
    seed = config.seed + 1000 * k
    torch.manual_seed(seed)
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    if s.batch_size % info.world:
        raise TrainError(f"--stage{k}-batch-size {s.batch_size} is not divisible by the {info.world} processes")
    # ---- data ----------------------------------------------------------------------------------
    records = ArrowRecords(sp.data, stage=k)
    if records.record_type == "MixRecord":
        records.select_stage(k)
    stream = BatchStream(records.lengths, s.batch_size, seed, group_by_length=s.group_by_length, stage=k,
                         where=str(sp.data))
    total = s.steps if s.steps > 0 else max(1, int(math.ceil((s.epochs or 1.0) * stream.batches_per_epoch)))
    # ---- model -----------------------------------------------------------------------------------
    full = config.lora.method == "full"
    on_cuda = info.device.type == "cuda"
    dtype = torch.bfloat16 if (on_cuda and not full) else torch.float32
    model = _load_cocoa_model(input_model, config, k, info.device, dtype)
    hf = model.model
    extra = [m for name, m in model.named_children() if m is not hf]  # stage 1's image decoder
    peft_model = apply_adapters(hf, config.lora, extra_trainable=extra)
    if config.gradient_checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(hf, "enable_input_require_grads") and not full:
            hf.enable_input_require_grads()
    if not full and dtype != torch.float32:
        for p in model.parameters():  # adapters and the decoder train in fp32 (master weights)
            if p.requires_grad:
                p.data = p.data.float()
    if k == 1 and model.image_decoder is not None and full:
        model.image_decoder.float()
    n_train, n_total = count_parameters(model)
    say(f"stage {k}: {len(records)} rows from {sp.data}, {total} steps x {s.batch_size} (micro {s.micro_batch_size}), "
        f"lr {s.lr:g}; {n_train:,} of {n_total:,} parameters trainable; input {input_model}")
    model.train()
    fsdp = info.enabled and (config.strategy == "fsdp" or (config.strategy == "auto" and full and on_cuda))
    wrapped = D.wrap_model(_dispatch_module(model), info, "fsdp" if fsdp else "ddp", full)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s.lr, betas=(0.9, 0.999), eps=1e-8)
    from transformers import get_scheduler

    warmup = int(round(s.warmup_ratio * total))
    sched_name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[s.schedule]
    scheduler = get_scheduler(sched_name, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    # ---- resume ------------------------------------------------------------------------------------
    start = 0
    ckpt = None
    if config.resume == "auto":
        ckpt = C.latest_checkpoint(sp.dir)
    elif config.resume not in ("never", "auto"):
        cand = Path(config.resume)
        if cand.is_dir() and cand.parent.parent.name == f"stage{k}":
            ckpt = cand
        elif cand.is_dir() and cand.parent.parent.name.startswith("stage"):
            ckpt = None  # a checkpoint of another stage: that stage resumes from it
        else:
            raise TrainError(f"--resume {config.resume}: not a checkpoint directory (OUT/stage{{k}}/checkpoints/step-N)")
    if ckpt is not None:
        state = C.load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler,
                                  rank=info.rank, world=info.world)
        start = int(state["step"])
        if info.is_main:
            metrics.truncate(k, start)
        say(f"stage {k}: resumed from {ckpt} at step {start}")
    elif info.is_main:
        metrics.truncate(k, 0)
    # ---- loop --------------------------------------------------------------------------------------
    collator = _make_collators(model, config, k, sp.data, seed)
    ds = StepBatches(records, stream, collator, k, start, total, info.rank, info.world, s.micro_batch_size, seed,
                     config.stage3.hard_negatives, on_bad_row=config.on_bad_row)
    loader = DataLoader(ds, batch_size=None, shuffle=False, num_workers=config.num_workers,
                        collate_fn=lambda x: x, persistent_workers=False,
                        prefetch_factor=2 if config.num_workers else None)
    method, method_kw = _stage_call(config, k) if k != 3 else ("", {})
    progress = _Progress(config.progress and info.is_main, k, total, start)
    amp = _autocast(info.device, config.precision)
    t_stage = time.time()
    stats = {"tokens": 0, "slots": 0, "rejected": 0, "truncated": 0, "samples": 0, "skipped": 0}
    step_counts = {"truncated": 0, "samples": 0, "skipped": 0}
    skipped_shown = 0
    warned_truncation = False
    last: dict[str, Any] = {}
    window_t, window_tok = time.time(), 0
    acc_loss, acc_parts, acc_tokens, acc_slots, acc_n = 0.0, {}, 0, 0, 0
    grad_norm = 0.0
    try:
        with progress:
            for item in loader:
                if "error" in item:
                    raise TrainError(item["error"])
                step, m, n_micro = item["step"], item["micro"], item["n_micro"]
                stats["rejected"] += item.get("rejected", 0)
                for key in step_counts:
                    v = item.get(key, 0)
                    step_counts[key] += len(v) if key == "skipped" else v
                for msg in item.get("skipped", ()):
                    if skipped_shown < 5:
                        say(f"[yellow]skipped[/yellow] (--on-bad-row skip) {msg}")
                    elif skipped_shown == 5:
                        say("[yellow]skipped[/yellow] more bad rows; their count is in metrics.jsonl and the summary")
                    skipped_shown += 1
                if k == 3:
                    loss_v, parts, tok, slots = _stage3_step(wrapped, model, item["groups"], config, info, amp)
                else:
                    batch = item["batch"]
                    if batch is None:
                        if info.enabled:  # DDP needs every rank's backward: no way to skip on one rank
                            raise TrainError(
                                f"stage {k} step {step}: every sample of a micro batch on rank {info.rank} was "
                                f"skipped as unreadable or rejected (its image does not fit --stage{k}-max-length "
                                f"{s.max_length}); fix the rows, raise "
                                f"--stage{k}-max-length or lower --stage{k}-image-max-pixels")
                        loss_v, parts, tok, slots = None, {}, 0, 0
                    else:
                        batch = _to(batch, info.device)
                        tok, slots = _count_tokens(batch)
                        last_micro = m == n_micro - 1
                        with D.no_sync(wrapped, not last_micro), amp:
                            out = wrapped(method, batch, **method_kw)
                        loss, parts = _as_loss(out)
                        (loss / n_micro).backward()
                        loss_v = float(loss.detach())
                if loss_v is not None:
                    acc_loss += loss_v / n_micro
                    acc_n += 1
                    for key, v in parts.items():
                        acc_parts[key] = acc_parts.get(key, 0.0) + v / n_micro
                acc_tokens += tok
                acc_slots += slots
                if m != n_micro - 1:
                    continue
                # ---- optimizer step ----
                if s.max_grad_norm > 0:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm))
                lr_used = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                # global figures
                tok_all = D.all_reduce_sum(acc_tokens, info)
                slots_all = D.all_reduce_sum(acc_slots, info)
                # stages 1-2: mean of the ranks' losses; stage 3: every rank holds the same global loss
                loss_all = D.all_reduce_sum(acc_loss, info) / info.world
                stats["tokens"] += int(tok_all)
                stats["slots"] += int(slots_all)
                window_tok += tok_all
                now = time.time()
                tps = window_tok / max(now - window_t, 1e-9)
                row = {"stage": k, "step": done, "loss": round(loss_all, 6), "lr": lr_used,
                       "grad_norm": round(grad_norm, 6), "tokens": int(tok_all), "tokens_per_s": round(tps, 2),
                       "padding_share": round(1 - tok_all / slots_all, 4) if slots_all else 0.0,
                       "time": round(now - t_stage, 3)}
                row.update({key: round(v, 6) for key, v in acc_parts.items()})
                # samples cut to --stageK-max-length and bad rows skipped, this step (all ranks)
                for key in step_counts:
                    v = int(D.all_reduce_sum(step_counts[key], info))
                    stats[key] += v
                    row[key] = v
                step_counts = {key: 0 for key in step_counts}
                if (not warned_truncation and stats["samples"] and stats["truncated"] > TRUNCATION_WARN * stats["samples"]):
                    warned_truncation = True
                    say(f"[yellow]warning:[/yellow] stage {k}: {stats['truncated']} of {stats['samples']} samples so far "
                        f"({stats['truncated'] / stats['samples']:.0%}) are longer than --stage{k}-max-length "
                        f"{s.max_length} tokens and were cut; raise --stage{k}-max-length if the text matters")
                if done % config.log_every == 0 or done == total:
                    metrics.log(row)
                last = row
                progress.update(done, row)
                if done % 20 == 0:
                    window_t, window_tok = now, 0
                acc_loss, acc_parts, acc_tokens, acc_slots, acc_n = 0.0, {}, 0, 0, 0
                if (s.save_every and done % s.save_every == 0) or done == total:
                    C.save_checkpoint(sp.dir, done, model=model, optimizer=optimizer, scheduler=scheduler,
                                      state={"stage": k, "config_hash": _config_hash(config, [k]), "epoch":
                                             stream.position(done).epoch, "batch_in_epoch": stream.position(done).index,
                                             "loss": row["loss"]},
                                      rank=info.rank, world=info.world, barrier=lambda: D.barrier(info),
                                      keep=config.keep_checkpoints,
                                      sharded=fsdp)
    finally:
        del loader
    # ---- finish: merge, save the stage model, plot ---------------------------------------------------
    rejected = int(D.all_reduce_sum(stats["rejected"], info))
    merge_adapters(peft_model)
    for p in model.parameters():
        p.requires_grad_(False)
    dest = sp.dir / "model"
    full_sd = _gather_full_state(model.model) if fsdp else None  # a collective: every rank
    if info.is_main:
        _save_stage_model(model, dest, k, input_model, full_sd)
        plot_loss(Path(config.out), k, sp.dir / "loss.png")
    D.barrier(info)
    share = 1 - stats["tokens"] / stats["slots"] if stats["slots"] else 0.0
    summary = {"steps": total, "start": start, "final_loss": last.get("loss"), "padding_share": round(share, 4),
               "rejected": rejected, "truncated": stats["truncated"], "samples": stats["samples"],
               "truncated_share": round(stats["truncated"] / stats["samples"], 4) if stats["samples"] else 0.0,
               "skipped_bad_rows": stats["skipped"], "seconds": round(time.time() - t_stage, 1), "model": str(dest)}
    if info.is_main:
        from ..shards import atomic_write_json

        atomic_write_json(sp.dir / "summary.json", summary)
    if stats["truncated"]:
        share_cut = stats["truncated"] / max(stats["samples"], 1)
        say(("[yellow]warning:[/yellow] " if share_cut > TRUNCATION_WARN else "")
            + f"stage {k}: {stats['truncated']} of {stats['samples']} samples ({share_cut:.1%}) were cut to "
            f"--stage{k}-max-length {s.max_length} tokens" + (f"; raise --stage{k}-max-length" if share_cut >
                                                               TRUNCATION_WARN else ""))
    say(f"stage {k}: done, loss {last.get('loss')}, padding share {share:.1%}"
        + (f", {rejected} samples rejected (image longer than max length)" if rejected else "")
        + (f", {stats['skipped']} bad rows skipped (--on-bad-row skip)" if stats["skipped"] else "")
        + f" -> {dest}")
    del model, wrapped, optimizer
    return summary


def _to(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    import torch

    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _stage3_step(wrapped: Any, model: Any, groups: list[list[dict[str, Any]]], config: TrainConfig, info: Any,
                 amp: Any) -> tuple[float, dict[str, float], int, int]:
    """One GradCache step over this rank's slice of the global batch; the loss is the global-batch InfoNCE
    (every rank computes it on the gathered embeddings; gradients reach the local slice), scaled by the
    world size because DDP averages gradients."""
    import torch

    from . import distributed as D
    from ..model.objectives import gather_with_grad, grad_cache_step, info_nce

    s3 = config.stage3
    tok = slots = 0
    for g in groups:
        for b in g:
            t, sl = _count_tokens(b)
            tok, slots = tok + t, slots + sl
    groups = [[_to(b, info.device) for b in g] for g in groups]
    n_chunks = sum(len(g) for g in groups)
    counter = {"grad_forwards": 0}

    def encode(batch: dict[str, Any]) -> torch.Tensor:
        ddp = wrapped if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) else None
        if ddp is not None and torch.is_grad_enabled():
            counter["grad_forwards"] += 1
            ddp.require_backward_grad_sync = counter["grad_forwards"] == n_chunks  # all-reduce once, at the end
        with amp:
            return wrapped("embed", batch, mask=s3.attention).float()

    def loss_fn(q: torch.Tensor, t: torch.Tensor, n: torch.Tensor | None = None) -> tuple[Any, dict[str, float]]:
        qa, ta = gather_with_grad(q), gather_with_grad(t)
        na = gather_with_grad(n) if n is not None else None
        return info_nce(qa, ta, temperature=s3.temperature, negatives=na, gather=False)

    if s3.grad_cache:
        loss, parts = grad_cache_step(encode, groups, loss_fn, scale=float(info.world))
    else:
        embs = [torch.cat([encode(b) for b in g], 0) for g in groups]
        loss, parts = loss_fn(*embs)
        (loss * info.world).backward()
        loss = loss.detach()
    out_parts = {"acc": float(parts.get("acc", 0.0))} if isinstance(parts, dict) else {}
    # every rank holds the same global loss; _train_stage averages over ranks
    return float(loss), out_parts, tok, slots


def _gather_full_state(hf: Any) -> dict[str, Any]:
    """The full (unsharded) state dict of an FSDP2 model, on CPU (rank 0 writes it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(hf, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _save_stage_model(model: Any, dest: Path, k: int, input_model: str, full_sd: dict[str, Any] | None = None
                      ) -> None:
    """``save_pretrained`` into a temp dir, then rename: the stage model appears complete or not at all."""
    tmp = dest.parent / f".{dest.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.spec = model.spec.model_copy(update={"base_model": model.spec.base_model or str(input_model)})
    if full_sd is None:
        model.save_pretrained(tmp, stages=[k])
    else:  # FSDP2: the gathered weights, then processor + cocoa.json as CocoaModel.save_pretrained writes them
        tmp.mkdir(parents=True)
        model.model.save_pretrained(tmp, state_dict=full_sd)
        model.processor.save_pretrained(tmp)
        model.spec.model_copy(update={"stages": sorted(set(model.spec.stages) | {k})}).save(tmp)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


class _Progress:
    """Progress on rank 0 (step, loss, lr, tokens/s, ETA): a live bar on a terminal, plain periodic lines in
    logs and pipes (:mod:`cocoa.progress`); silent elsewhere."""

    def __init__(self, enabled: bool, stage: int, total: int, start: int) -> None:
        self.enabled = enabled
        self.p = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            from ..progress import Progress

            self.p = Progress(TextColumn(f"stage {stage}"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                              TimeRemainingColumn(), console=Console(stderr=True), transient=False, unit="steps")
            self.task = self.p.add_task(f"stage {stage}", total=total, completed=start, info="")

    def __enter__(self) -> "_Progress":
        if self.p is not None:
            self.p.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.p is not None:
            self.p.__exit__(*exc)

    def update(self, done: int, row: dict[str, Any]) -> None:
        if self.p is not None:
            info = (f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  {row['tokens_per_s']:.0f} tok/s  "
                    f"pad {row['padding_share']:.0%}")
            self.p.update(self.task, completed=done, info=info)


__all__ = ["run_training", "validate", "check_model", "TrainError", "read_metrics", "plot_loss", "Plan",
           "default_model_dir", "StepBatches"]
