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

Every input is validated before any model weights are loaded (:mod:`~cocoa.train.preflight`); rank 0 then
locks and prepares the run directory (:mod:`~cocoa.train.run_dir`) and each stage runs through
:mod:`~cocoa.train.stage` (steps 1-6 above).
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

from .config import TrainConfig, resolve_preset
from .metrics import Metrics
from .preflight import Plan, TrainError, validate
from .run_dir import check_out_dir, prepare_run_dir, stage_done
from .stage import train_stage
from ..errors import CocoaError


def run_training(config: TrainConfig, console: Any = None) -> dict[str, Any]:
    """Run the configured stages; returns ``{"out": ..., "stages": {k: model_dir}, ...}``."""
    from . import distributed as D

    config = resolve_preset(config)
    plan = validate(config)  # before any compute
    info = D.init()
    try:
        return _run(plan, info, console)
    finally:
        D.shutdown()


def _run(plan: Plan, info: Any, console: Any) -> dict[str, Any]:
    """Rank 0 takes the run lock and prepares the run directory; every rank stops on its error."""
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
    """The selected stages in order, each from the previous one's model; a finished stage is skipped."""
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
            if stage_done(sp.dir) and config.resume != "never":
                say(f"stage {sp.stage}: already finished ({sp.dir / 'model'}), skipping")
            else:
                summary = train_stage(sp, prev_model, config, info, metrics, say)
                results["summary"][sp.stage] = summary
            prev_model = str(sp.dir / "model")
            results["stages"][sp.stage] = prev_model
    finally:
        metrics.close()
    return results


__all__ = ["run_training"]
