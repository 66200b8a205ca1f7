"""The stage runner: one CoCoA stage as four steps -- :func:`build` (seeds, data, model, adapters, DDP /
FSDP2 wrap, optimizer, schedule), :func:`resume` (from the latest or the given checkpoint),
:func:`run_steps` (micro batches, accumulation, the optimizer step, metrics, progress, checkpoints) and
:func:`finish` (merge the adapters, save ``OUT/stageK/model`` atomically, draw ``loss.png``, write
``summary.json``); :func:`train_stage` chains them.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .metrics import Metrics, StepProgress, plot_loss
from .preflight import StagePlan, TrainError
from .run_dir import config_hash
from ..errors import CocoaError

TRUNCATION_WARN = 0.05  # warn when more than this share of a stage's samples is cut to --stageK-max-length


@dataclass
class Stage:
    """One stage being trained: what :func:`build` made; ``start`` (the first step to run) is set by
    :func:`resume`."""

    sp: StagePlan
    input_model: str
    config: TrainConfig
    info: Any  # distributed.DistInfo
    seed: int
    records: Any
    stream: Any
    total: int
    model: Any
    peft_model: Any
    wrapped: Any
    fsdp: bool
    params: list[Any]
    optimizer: Any
    scheduler: Any
    start: int = 0

    @property
    def k(self) -> int:
        return self.sp.stage

    @property
    def s(self) -> Any:
        return self.config.stage(self.sp.stage)


def train_stage(sp: StagePlan, input_model: str, config: TrainConfig, info: Any, metrics: Metrics,
                say: Any) -> dict[str, Any]:
    """Train stage ``sp.stage`` from ``input_model``; returns the stage summary (also in ``summary.json``)."""
    st = build(sp, input_model, config, info, say)
    resume(st, metrics, say)
    tally = run_steps(st, metrics, say)
    return finish(st, tally, say)


# ---------------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------------
def build(sp: StagePlan, input_model: str, config: TrainConfig, info: Any, say: Any) -> Stage:
    """Seed, open the stage's data, load and wrap the model, make the optimizer and the schedule."""
    import random

    import numpy as np
    import torch

    from . import distributed as D
    from .lora import count_parameters
    from .method import dispatch_module

    k, s = sp.stage, config.stage(sp.stage)
    seed = config.seed + 1000 * k
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    if s.batch_size % info.world:
        raise TrainError(f"--stage{k}-batch-size {s.batch_size} is not divisible by the {info.world} processes")
    records, stream, total = _open_data(sp, s, seed)
    full = config.lora.method == "full"
    on_cuda = info.device.type == "cuda"
    model, peft_model = _load_model(input_model, config, k, info, full)
    n_train, n_total = count_parameters(model)
    say(f"stage {k}: {len(records)} rows from {sp.data}, {total} steps x {s.batch_size} (micro {s.micro_batch_size}), "
        f"lr {s.lr:g}; {n_train:,} of {n_total:,} parameters trainable; input {input_model}")
    model.train()
    fsdp = info.enabled and (config.strategy == "fsdp" or (config.strategy == "auto" and full and on_cuda))
    wrapped = D.wrap_model(dispatch_module(model), info, "fsdp" if fsdp else "ddp", full)
    params, optimizer, scheduler = _optimizer(model, s, total)
    return Stage(sp=sp, input_model=input_model, config=config, info=info, seed=seed, records=records,
                 stream=stream, total=total, model=model, peft_model=peft_model, wrapped=wrapped, fsdp=fsdp,
                 params=params, optimizer=optimizer, scheduler=scheduler)


def _open_data(sp: StagePlan, s: Any, seed: int) -> tuple[Any, Any, int]:
    """The stage's records (a MixRecord dataset narrowed to the stage's rows), its batch stream and step count."""
    from .data import ArrowRecords, BatchStream

    k = sp.stage
    records = ArrowRecords(sp.data, stage=k)
    if records.record_type == "MixRecord":
        records.select_stage(k)
    stream = BatchStream(records.lengths, s.batch_size, seed, group_by_length=s.group_by_length, stage=k,
                         where=str(sp.data))
    total = s.steps if s.steps > 0 else max(1, int(math.ceil((s.epochs or 1.0) * stream.batches_per_epoch)))
    from .config import MAX_STEPS

    if total > MAX_STEPS:
        raise TrainError(f"--stage{k}-epochs {s.epochs:g} makes {total:,} steps, more than {MAX_STEPS:,}; give fewer "
                         f"--stage{k}-epochs or --stage{k}-steps")
    return records, stream, total


def _load_model(input_model: str, config: TrainConfig, k: int, info: Any, full: bool) -> tuple[Any, Any]:
    """The stage's CocoaModel with adapters (or every weight trainable), gradient checkpointing and fp32
    trainable weights; returns ``(model, peft_model)``."""
    import torch

    from .lora import apply_adapters
    from .method import load_cocoa_model

    on_cuda = info.device.type == "cuda"
    # adapters: the frozen base in bf16 whenever the run computes in bf16 (auto on CUDA, or --precision bf16 on
    # CPU too: a 3B base in fp32 is 15 GB); trainable weights are fp32 master weights (below)
    bf16 = config.precision == "bf16" or (config.precision == "auto" and on_cuda)
    dtype = torch.bfloat16 if (bf16 and not full) else torch.float32
    model = load_cocoa_model(input_model, config, k, info.device, dtype)
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
    return model, peft_model


def _optimizer(model: Any, s: Any, total: int) -> tuple[list[Any], Any, Any]:
    """AdamW (no weight decay on biases and norms) and the warmup + decay schedule."""
    import torch
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s.lr, betas=(0.9, 0.999), eps=1e-8)
    warmup = int(round(s.warmup_ratio * total))
    sched_name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[s.schedule]
    scheduler = get_scheduler(sched_name, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    return params, optimizer, scheduler


# ---------------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------------
def resume(st: Stage, metrics: Metrics, say: Any) -> None:
    """Load ``--resume auto``'s latest checkpoint of the stage (or the one given) and set ``st.start``;
    drop the metrics lines written after it."""
    from . import checkpoint as C

    config, info, k, sp = st.config, st.info, st.k, st.sp
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
        if config.resume not in ("never", "auto"):
            _check_foreign_checkpoint(ckpt, config, k)
        state = C.load_checkpoint(ckpt, model=st.model, optimizer=st.optimizer, scheduler=st.scheduler,
                                  rank=info.rank, world=info.world, max_step=st.total)
        st.start = int(state["step"])
        if info.is_main:
            metrics.truncate(k, st.start)
        say(f"stage {k}: resumed from {ckpt} at step {st.start}")
    elif info.is_main:
        metrics.truncate(k, 0)


def _check_foreign_checkpoint(ckpt: Path, config: TrainConfig, k: int) -> None:
    """``--resume PATH``: the checkpoint must have been made with this run's settings for stage ``k`` (the
    same refusal as a rerun: each differing setting named, from its run's config.yaml when there is one)."""
    from . import checkpoint as C
    from .config import ConfigError
    from .run_dir import _flag, settings_diff

    state = C.read_state(ckpt)
    saved = state.get("config_hash")
    if saved == config_hash(config, [k]):
        return
    run_yaml = ckpt.parent.parent.parent / "config.yaml"
    shown = ""
    if run_yaml.is_file():
        try:
            diff = settings_diff(TrainConfig.from_yaml(run_yaml), config, [k])
        except (ConfigError, CocoaError):
            diff = []
        shown = "; ".join(f"{_flag(key)} was {a!r}, now {b!r}" for key, a, b in diff[:8])
        if len(diff) > 8:
            shown += f" (and {len(diff) - 8} more)"
    raise TrainError(
        f"--resume {ckpt}: that checkpoint was made with other settings for stage {k}"
        + (f": {shown}" if shown else f" (settings hash {saved!r}, this run's {config_hash(config, [k])!r})")
        + ". Resuming with different ones would mix runs: use that run's settings"
        + (f" (they are in {run_yaml})" if run_yaml.is_file() else "") + ", or start without --resume PATH")


# ---------------------------------------------------------------------------------------------------
# steps
# ---------------------------------------------------------------------------------------------------
@dataclass
class Tally:
    """The running figures of a stage: totals, this step's counts, the accumulated micro batches."""

    t_stage: float = field(default_factory=time.time)
    stats: dict[str, int] = field(default_factory=lambda: {"tokens": 0, "slots": 0, "rejected": 0, "truncated": 0,
                                                            "samples": 0, "skipped": 0})
    step_counts: dict[str, int] = field(default_factory=lambda: {"truncated": 0, "samples": 0, "skipped": 0})
    skipped_shown: int = 0
    warned_truncation: bool = False
    last: dict[str, Any] = field(default_factory=dict)
    window_t: float = field(default_factory=time.time)
    window_tok: float = 0
    acc_loss: float = 0.0
    acc_parts: dict[str, float] = field(default_factory=dict)
    acc_tokens: int = 0
    acc_slots: int = 0
    grad_norm: float = 0.0

    def add(self, loss_v: float | None, parts: dict[str, float], tok: int, slots: int, n_micro: int) -> None:
        """Accumulate one micro batch (``loss_v`` None: every sample of it was skipped)."""
        if loss_v is not None:
            self.acc_loss += loss_v / n_micro
            for key, v in parts.items():
                self.acc_parts[key] = self.acc_parts.get(key, 0.0) + v / n_micro
        self.acc_tokens += tok
        self.acc_slots += slots

    def reset_accumulation(self) -> None:
        self.acc_loss, self.acc_parts, self.acc_tokens, self.acc_slots = 0.0, {}, 0, 0


def run_steps(st: Stage, metrics: Metrics, say: Any) -> Tally:
    """Steps ``st.start`` .. ``st.total``: each item of the loader is a micro batch (stages 1-2) or a whole
    step (stage 3); the last micro batch of a step is followed by the optimizer step."""
    from .method import autocast, stage_call

    config, info, k = st.config, st.info, st.k
    loader = _loader(st)
    method, method_kw = stage_call(config, k) if k != 3 else ("", {})
    progress = StepProgress(config.progress and info.is_main, k, st.total, st.start)
    amp = autocast(info.device, config.precision)
    tally = Tally()
    try:
        with progress:
            for item in loader:
                if "error" in item:
                    raise TrainError(item["error"])
                _count_item(tally, item, say)
                loss_v, parts, tok, slots = _forward_backward(st, item, method, method_kw, amp)
                tally.add(loss_v, parts, tok, slots, item["n_micro"])
                if item["micro"] == item["n_micro"] - 1:
                    _optimizer_step(st, item["step"], tally, metrics, progress, say)
    finally:
        del loader
    return tally


def _loader(st: Stage) -> Any:
    """A DataLoader over the stage's :class:`~cocoa.train.batches.StepBatches` from ``st.start``."""
    from torch.utils.data import DataLoader

    from .batches import StepBatches
    from .method import make_collator

    config, info, s = st.config, st.info, st.s
    collator = make_collator(st.model, config, st.k, st.sp.data, st.seed)
    ds = StepBatches(st.records, st.stream, collator, st.k, st.start, st.total, info.rank, info.world,
                     s.micro_batch_size, st.seed, config.stage3.hard_negatives, on_bad_row=config.on_bad_row)
    return DataLoader(ds, batch_size=None, shuffle=False, num_workers=config.num_workers,
                      collate_fn=lambda x: x, persistent_workers=False,
                      prefetch_factor=2 if config.num_workers else None)


def _count_item(tally: Tally, item: dict[str, Any], say: Any) -> None:
    """Count an item's rejected, truncated, sampled and skipped rows; name the first skipped rows."""
    tally.stats["rejected"] += item.get("rejected", 0)
    for key in tally.step_counts:
        v = item.get(key, 0)
        tally.step_counts[key] += len(v) if key == "skipped" else v
    for msg in item.get("skipped", ()):
        if tally.skipped_shown < 5:
            say(f"[yellow]skipped[/yellow] (--on-bad-row skip) {msg}")
        elif tally.skipped_shown == 5:
            say("[yellow]skipped[/yellow] more bad rows; their count is in metrics.jsonl and the summary")
        tally.skipped_shown += 1


def _forward_backward(st: Stage, item: dict[str, Any], method: str, method_kw: dict[str, Any], amp: Any
                      ) -> tuple[float | None, dict[str, float], int, int]:
    """Loss and backward of one item: ``(loss, loss parts, real tokens, token slots)``; loss None when every
    sample of a micro batch was skipped (one process only)."""
    from . import distributed as D
    from .batches import count_tokens
    from .method import as_loss, stage3_step, to_device

    k, info = st.k, st.info
    if k == 3:
        return stage3_step(st.wrapped, st.model, item["groups"], st.config, info, amp)
    batch = item["batch"]
    if batch is None:
        if info.enabled:  # DDP needs every rank's backward: no way to skip on one rank
            raise TrainError(
                f"stage {k} step {item['step']}: every sample of a micro batch on rank {info.rank} was "
                f"skipped as unreadable or rejected (its image does not fit --stage{k}-max-length "
                f"{st.s.max_length}); fix the rows, raise "
                f"--stage{k}-max-length or lower --stage{k}-image-max-pixels")
        return None, {}, 0, 0
    n_micro = item["n_micro"]
    batch = to_device(batch, info.device)
    tok, slots = count_tokens(batch)
    last_micro = item["micro"] == n_micro - 1
    with D.no_sync(st.wrapped, not last_micro), amp:
        out = st.wrapped(method, batch, **method_kw)
    loss, parts = as_loss(out)
    (loss / n_micro).backward()
    return float(loss.detach()), parts, tok, slots


def _optimizer_step(st: Stage, step: int, tally: Tally, metrics: Metrics, progress: StepProgress, say: Any) -> None:
    """Clip, step the optimizer and the schedule, then log the step's global figures (all ranks), show
    progress and checkpoint every ``save_every`` steps and at the end."""
    import torch

    from . import distributed as D

    config, info, k, s = st.config, st.info, st.k, st.s
    if s.max_grad_norm > 0:
        tally.grad_norm = float(torch.nn.utils.clip_grad_norm_(st.params, s.max_grad_norm))
    lr_used = st.scheduler.get_last_lr()[0]
    done = step + 1
    # stages 1-2: mean of the ranks' losses; stage 3: every rank holds the same global loss
    loss_all = D.all_reduce_sum(tally.acc_loss, info) / info.world
    if not math.isfinite(loss_all) or not math.isfinite(tally.grad_norm):
        what = f"loss {loss_all}" if not math.isfinite(loss_all) else f"gradient norm {tally.grad_norm}"
        raise _diverged(st, done, what)
    st.optimizer.step()
    st.scheduler.step()
    st.optimizer.zero_grad(set_to_none=True)
    # global figures
    tok_all = D.all_reduce_sum(tally.acc_tokens, info)
    slots_all = D.all_reduce_sum(tally.acc_slots, info)
    stats = tally.stats
    stats["tokens"] += int(tok_all)
    stats["slots"] += int(slots_all)
    tally.window_tok += tok_all
    now = time.time()
    tps = tally.window_tok / max(now - tally.window_t, 1e-9)
    row = {"stage": k, "step": done, "loss": round(loss_all, 6), "lr": lr_used,
           "grad_norm": round(tally.grad_norm, 6), "tokens": int(tok_all), "tokens_per_s": round(tps, 2),
           "padding_share": round(1 - tok_all / slots_all, 4) if slots_all else 0.0,
           "time": round(now - tally.t_stage, 3)}
    row.update({key: round(v, 6) for key, v in tally.acc_parts.items()})
    # samples cut to --stageK-max-length and bad rows skipped, this step (all ranks)
    for key in tally.step_counts:
        v = int(D.all_reduce_sum(tally.step_counts[key], info))
        stats[key] += v
        row[key] = v
    tally.step_counts = {key: 0 for key in tally.step_counts}
    if (not tally.warned_truncation and stats["samples"] and stats["truncated"] > TRUNCATION_WARN * stats["samples"]):
        tally.warned_truncation = True
        say(f"[yellow]warning:[/yellow] stage {k}: {stats['truncated']} of {stats['samples']} samples so far "
            f"({stats['truncated'] / stats['samples']:.0%}) are longer than --stage{k}-max-length "
            f"{s.max_length} tokens and were cut; raise --stage{k}-max-length if the text matters")
    if done % config.log_every == 0 or done == st.total:
        metrics.log(row)
    tally.last = row
    progress.update(done, row)
    if done % 20 == 0:
        tally.window_t, tally.window_tok = now, 0
    tally.reset_accumulation()
    if (s.save_every and done % s.save_every == 0) or done == st.total:
        _save_checkpoint(st, done, row["loss"])


def _diverged(st: Stage, done: int, what: str) -> TrainError:
    k, s = st.k, st.s
    return TrainError(
        f"stage {k} step {done}: training diverged ({what}; --stage{k}-lr {s.lr:g}, --stage{k}-weight-decay "
        f"{s.weight_decay:g}); nothing of it was saved. Lower --stage{k}-lr (or the weight decay), then rerun: it "
        f"resumes from the last good checkpoint (--resume auto), or start over with --overwrite")


def _check_finite_weights(st: Stage, done: int) -> None:
    """Refuse to save (a checkpoint or the stage model) weights that are no longer finite (every rank: a
    collective under torchrun)."""
    import torch

    from . import distributed as D

    bad = 0
    with torch.no_grad():
        for p in st.params:
            t = p.to_local() if hasattr(p, "to_local") else p
            if t.numel() and not bool(torch.isfinite(t).all()):
                bad += 1
    if D.all_reduce_sum(bad, st.info):
        raise _diverged(st, done, "weights became nan or inf")


def _save_checkpoint(st: Stage, done: int, loss: float) -> None:
    from . import checkpoint as C
    from . import distributed as D

    config, info, k = st.config, st.info, st.k
    _check_finite_weights(st, done)
    C.save_checkpoint(st.sp.dir, done, model=st.model, optimizer=st.optimizer, scheduler=st.scheduler,
                      state={"stage": k, "config_hash": config_hash(config, [k]), "epoch":
                             st.stream.position(done).epoch, "batch_in_epoch": st.stream.position(done).index,
                             "loss": loss},
                      rank=info.rank, world=info.world, barrier=lambda: D.barrier(info),
                      keep=config.keep_checkpoints,
                      sharded=st.fsdp)


# ---------------------------------------------------------------------------------------------------
# finish
# ---------------------------------------------------------------------------------------------------
def finish(st: Stage, tally: Tally, say: Any) -> dict[str, Any]:
    """Merge the adapters, save the stage model, plot the loss, write and say the summary."""
    from . import distributed as D
    from .lora import merge_adapters

    config, info, k, s, stats, last = st.config, st.info, st.k, st.s, tally.stats, tally.last
    model = st.model
    rejected = int(D.all_reduce_sum(stats["rejected"], info))
    merge_adapters(st.peft_model)
    for p in model.parameters():
        p.requires_grad_(False)
    dest = st.sp.dir / "model"
    full_sd = _gather_full_state(model.model) if st.fsdp else None  # a collective: every rank
    if info.is_main:
        _save_stage_model(model, dest, k, st.input_model, full_sd)
        plot_loss(Path(config.out), k, st.sp.dir / "loss.png")
    D.barrier(info)
    share = 1 - stats["tokens"] / stats["slots"] if stats["slots"] else 0.0
    summary = {"steps": st.total, "start": st.start, "final_loss": last.get("loss"), "padding_share": round(share, 4),
               "rejected": rejected, "truncated": stats["truncated"], "samples": stats["samples"],
               "truncated_share": round(stats["truncated"] / stats["samples"], 4) if stats["samples"] else 0.0,
               "skipped_bad_rows": stats["skipped"], "seconds": round(time.time() - tally.t_stage, 1),
               "model": str(dest)}
    if info.is_main:
        from ..shards import atomic_write_json

        atomic_write_json(st.sp.dir / "summary.json", summary)
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
    return summary


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


__all__ = ["train_stage", "build", "resume", "run_steps", "finish", "Stage", "Tally", "TRUNCATION_WARN"]
