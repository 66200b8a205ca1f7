"""The pre-training run: vision alignment, then next-token training on the response tokens, the
end-of-run check that the model reads its images (:func:`image_gap`), and the save."""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ...records import PairRecord, RecordError
from .batches import _Batcher, _image_size, _length_grouped_batches, response_loss
from .config import ALIGN_METRICS_FILE, METRICS_FILE, PRETRAIN_VERSION, PretrainConfig, trained_settings
from .data import data_key, load_records
from .examples import SHORT_CHARS, SHORT_KINDS, Example, examples_from_record, heldout_examples


def pretrain(config: PretrainConfig, out_dir: str | Path, *, records: list[PairRecord] | None = None,
             image_root: Path | None = None, dkey: str = "", console: Any = None) -> Path:
    """Pre-train generatively and save to ``out_dir`` (which must not exist or be empty)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, get_cosine_schedule_with_warmup

    from ...model.spec import EmbeddingSpec
    from ..build import tiny_model_dir

    out = Path(out_dir)
    from ...fs import has_content

    if has_content(out):
        raise RecordError(f"{out} already exists and is not empty; choose another output or pass --overwrite")
    if records is None:
        records, image_root = load_records(config.data, config)
        dkey = dkey or data_key(config.data, config)
    base = Path(config.base) if config.base else tiny_model_dir(config.arch, seed=config.seed)
    spec = EmbeddingSpec.load(base)

    examples = [ex for rec in records for ex in examples_from_record(rec, config.seed)]
    if not examples:
        raise RecordError("no generative examples in the data: pre-training needs PairRecords with a query image "
                          "and a text positive, or with a scene graph in meta['scene']")

    torch.manual_seed(config.seed)
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(base)
    batcher = _Batcher(processor, spec.eos_token, config.max_length, image_root)

    # Length filter (counted, reported): image tokens from the processor's own patch arithmetic.
    ip = processor.image_processor
    merge = ip.merge_size
    n_img_cache: dict[tuple[int, int], int] = {}
    kept: list[Example] = []
    lengths: list[int] = []
    skipped = 0
    for ex in examples:
        w, h = _image_size(ex.image, image_root)
        if (w, h) not in n_img_cache:
            n_img_cache[(w, h)] = ip.get_number_of_image_patches(h, w, {}) // (merge * merge)
        n = batcher.length(ex, n_img_cache[(w, h)])
        if n <= config.max_length:
            kept.append(ex)
            lengths.append(n)
        else:
            skipped += 1
    if not kept:
        raise RecordError(f"every example is longer than --max-length {config.max_length}; raise it")
    kinds: dict[str, int] = {}
    for ex in kept:
        kinds[ex.kind] = kinds.get(ex.kind, 0) + 1

    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98))
    sched = get_cosine_schedule_with_warmup(opt, max(1, int(config.warmup * config.steps)), config.steps)
    order_rng = random.Random(config.seed)
    order: list[list[int]] = []
    # Curriculum: the first steps see only short answers that only the image can give; with the captions
    # from step 1 the LM learns the captions' language (most of their tokens) and never starts looking.
    short = [i for i, ex in enumerate(kept) if ex.kind in SHORT_KINDS and len(ex.response) <= SHORT_CHARS]
    short_steps = int(config.curriculum * config.steps) if short else 0
    short_order: list[list[int]] = []

    tmp = out.parent / f".{out.name}.tmp-{int(time.time() * 1000)}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    losses: list[float] = []
    t0 = time.perf_counter()
    try:
        with open(tmp / METRICS_FILE, "w") as mf, _progress(config.progress, console) as prog:
            align = None
            if config.align_steps:
                atask = prog.add_task("aligning vision", total=config.align_steps, loss=float("nan"))
                with open(tmp / ALIGN_METRICS_FILE, "w") as af:
                    def on_align_step(s: int, m: dict[str, float]) -> None:
                        af.write(json.dumps({"step": s, **{k: round(v, 5) for k, v in m.items()}}) + "\n")
                        af.flush()
                        prog.update(atask, advance=1, loss=m["loss"])

                    align = _align(model, processor, kept, image_root, config, on_align_step)
            task = prog.add_task("pre-training", total=config.steps, loss=float("nan"))
            for step in range(1, config.steps + 1):
                if step <= short_steps:
                    if not short_order:
                        short_order = [[short[j] for j in b] for b in _length_grouped_batches(
                            [lengths[i] for i in short], config.batch_size, order_rng)]
                    idx = short_order.pop()
                else:
                    if not order:
                        order = _length_grouped_batches(lengths, config.batch_size, order_rng)
                    idx = order.pop()
                ts = time.perf_counter()
                batch = batcher([kept[i] for i in idx])
                loss = response_loss(model, batch)
                if not torch.isfinite(loss):
                    raise RecordError(f"pre-training diverged at step {step} (loss {loss.item()}); lower --lr")
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                lv = float(loss.item())
                losses.append(lv)
                dt = time.perf_counter() - ts
                mf.write(json.dumps({"step": step, "loss": round(lv, 5), "lr": sched.get_last_lr()[0],
                                     "grad_norm": round(float(gnorm), 4), "step_s": round(dt, 4),
                                     "tokens": int(batch["attention_mask"].sum())}) + "\n")
                mf.flush()
                prog.update(task, advance=1, loss=sum(losses[-10:]) / len(losses[-10:]))
        elapsed = time.perf_counter() - t0
        model.eval()
        # Does it see? Held-out loss with the right vs. shuffled images (a ratio of 1.00: it does not).
        gap = image_gap(model, processor, spec.eos_token, heldout_examples())
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        k = min(20, len(losses))
        extra = dict(spec.extra)
        extra.update({
            "pretrained": "generative", "pretrain_version": PRETRAIN_VERSION, **trained_settings(config),
            "base": str(config.base or f"tiny {config.arch} seed {config.seed}"), "data_key": dkey,
            "examples": len(kept), "examples_by_kind": kinds, "skipped_too_long": skipped,
            "loss_first": round(sum(losses[:k]) / k, 5), "loss_last": round(sum(losses[-k:]) / k, 5),
            "seconds": round(elapsed, 1), "curriculum_steps": short_steps, "image_gap": gap,
            "vision_align": align,
        })
        EmbeddingSpec(**{**spec.model_dump(), "stages": [], "extra": extra,
                         "base_model": spec.base_model + " + generative pre-training"}).save(tmp)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            from ...fs import remove_owned_tree

            remove_owned_tree(out)  # empty or only cocoa's marker/lock (checked above)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _align(model, processor, kept: list[Example], image_root: Path | None, config: PretrainConfig,  # type: ignore[no-untyped-def]
           on_step) -> dict[str, Any]:
    """Contrastive alignment of the vision tower (:mod:`cocoa.tiny.vision_align`) on the image -> text
    examples (captions, text positives), scored on held-out scenes captions."""
    from ..vision_align import ALIGN_KINDS, align_vision

    def pair(ex: Example, root: Path | None) -> tuple[Any, str]:
        return (lambda: ex.image.load(root)), ex.response

    pairs = [pair(ex, image_root) for ex in kept if ex.kind in ALIGN_KINDS and ex.response.strip()]
    if len(pairs) < 2:
        raise RecordError(f"vision alignment needs image -> text examples (captions or text positives); the data "
                          f"has {len(pairs)}. Pass --align-steps 0 to skip it")
    heldout = [pair(ex, None) for ex in heldout_examples() if ex.kind == "caption"][:64]
    return align_vision(model, processor, pairs, steps=config.align_steps, batch_size=config.align_batch_size,
                        lr=config.align_lr, seed=config.seed, heldout=heldout, on_step=on_step)


def image_gap(model, processor, eos_token: str, examples: list[Example], *, per_kind: int = 48,  # type: ignore[no-untyped-def]
              batch_size: int = 16, image_root: Path | None = None, seed: int = 0) -> dict[str, Any]:
    """Does the model use the image? Response loss with the right images vs. with the images shuffled
    among the examples, per example kind: ``{kind: {"right": .., "shuffled": .., "ratio": shuffled/right}}``.
    A ratio of 1.00 means the image carries no information the model uses."""
    import torch

    batcher = _Batcher(processor, eos_token, 10**6, image_root)
    was_training = model.training
    model.eval()
    out: dict[str, Any] = {}
    try:
        with torch.no_grad():
            for kind in sorted({ex.kind for ex in examples}):
                exs = [ex for ex in examples if ex.kind == kind][:per_kind]
                if len(exs) < 2:
                    continue
                imgs = [ex.image for ex in exs]
                random.Random(seed).shuffle(imgs)
                shuffled = [replace(ex, image=im) for ex, im in zip(exs, imgs)]
                res = {}
                for name, batch_exs in (("right", exs), ("shuffled", shuffled)):
                    tot = 0.0
                    for i in range(0, len(batch_exs), batch_size):
                        chunk = batch_exs[i:i + batch_size]
                        tot += float(response_loss(model, batcher(chunk))) * len(chunk)
                    res[name] = round(tot / len(batch_exs), 4)
                res["ratio"] = round(res["shuffled"] / max(res["right"], 1e-9), 3)
                out[kind] = res
    finally:
        model.train(was_training)
    return out


def _progress(enabled: bool, console: Any = None):  # type: ignore[no-untyped-def]
    from ...progress import bar  # a live bar on a terminal, plain lines in logs and pipes

    return bar(unit="steps", fields=("loss {task.fields[loss]:.3f}",), console=console, disable=not enabled)
