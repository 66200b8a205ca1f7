"""Generative pre-training of the tiny model: causal attention, next-token prediction on the scenes.

The paper starts from a generatively pre-trained MLLM (Qwen2-VL), so the experiments here start from a
tiny Qwen2-VL trained the way Qwen2-VL was: an image (+ an instruction or question) is the prompt, the
answer / label / caption is the response, and the loss is taken on the response tokens only.

Examples come from ``PairRecord`` shards (``DATA/original`` or a dataset directory):

* every record whose query has an image and whose positive is text (classification, VQA, image ->
  caption): prompt = the query (``<|image_1|>`` replaced by the image block), response = ``pos_text``;
* every record with a scene graph in ``meta["scene"]``: the scene image -> a detailed caption (counts,
  sizes, materials, positions, printed text, relations), and for grounding records (``meta["target"]``)
  the query -> a description of the referred object and where it is.

Sequences use cocoa's plain layout (docs/design.md): ``<|vision_start|><|image_pad|>…<|vision_end|>``
prompt ``\\n`` response ``<|endoftext|>``; the processor expands the image pads.

:func:`pretrain` trains and saves (``save_pretrained`` + ``cocoa.json`` with ``stages: []`` and
``extra["pretrained"] = "generative"``); :func:`pretrained_tiny_dir` returns a cached build keyed by the
data manifest checksums and the settings, so the demo and the ablation build it once.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from ..config import Config
from ..records import ImageRef, PairRecord, RecordError, canonical_json, digest
from ..errors import CocoaError

IMAGE_PLACEHOLDER = "<|image_1|>"
PRETRAIN_VERSION = 3
DEFAULT_STEPS = 400
METRICS_FILE = "pretrain_metrics.jsonl"
ALIGN_METRICS_FILE = "align_metrics.jsonl"  # one row per vision-alignment step

SHORT_KINDS = ("count", "objects", "pair")  # curriculum: short answers the image alone determines
SHORT_CHARS = 48  # longer "pair" responses (retrieval captions) wait for the full mix
COUNT_PROMPT = "How many objects are in the image?"
OBJECTS_PROMPT = "Name the objects from top left to bottom right."
CAPTION_PROMPTS = (
    "Describe the image in detail.",
    "Give a detailed caption of this scene.",
    "What is in this picture? Describe every object.",
)


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


# --------------------------------------------------------------------------------------------------
# captions from scene graphs
# --------------------------------------------------------------------------------------------------
def _where(o: dict[str, Any]) -> str:
    x, y = float(o["x"]), float(o["y"])
    h = "left" if x < 0.37 else "right" if x > 0.63 else ""
    v = "top" if y < 0.37 else "bottom" if y > 0.63 else ""
    if not h and not v:
        return "in the center"
    if h and v:
        return f"at the {v} {h}"
    return f"on the {h}" if h else f"at the {v}"


def _obj_phrase(o: dict[str, Any]) -> str:
    s = f"{o['size']} {o['material']} {o['color']} {o['shape']}"
    if o.get("text"):
        s += f" with '{o['text']}' printed on it"
    return s


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def describe_scene(scene: dict[str, Any], rng: random.Random, max_relations: int = 2) -> str:
    """A detailed caption of a scene graph (``Scene.to_dict()`` layout): count, every object with size,
    material, colour, shape, printed text and position, and up to ``max_relations`` relations."""
    try:
        objs = list(scene["objects"])
        if not objs:
            raise ValueError("no objects")
        parts = [f"{_a(_obj_phrase(o))} {_where(o)}" for o in reading_order(objs)]
    except (KeyError, TypeError, ValueError) as e:
        raise RecordError(f"meta['scene'] is not a scene graph ({type(e).__name__}: {e}); "
                          "expected Scene.to_dict() output with objects") from None
    n = len(objs)
    body = parts[0] if n == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    text = f"{n} object{'s' if n != 1 else ''}: {body}."
    rels = [r for r in scene.get("relations", []) if r.get("relation") != "overlapping"
            and 0 <= r.get("subject", -1) < n and 0 <= r.get("object", -1) < n]
    rels = [r for r in rels if r["subject"] < r["object"]]  # each pair once
    for r in rng.sample(rels, min(max_relations, len(rels))):
        a, b = objs[r["subject"]], objs[r["object"]]
        text += f" The {a['color']} {a['shape']} is {r['relation']} the {b['color']} {b['shape']}."
    over = [r for r in scene.get("relations", []) if r.get("relation") == "overlapping"]
    if over:
        text += f" {len(over)} pair{'s' if len(over) != 1 else ''} of objects overlap."
    return text


def _band(o: dict[str, Any]) -> int:
    y = float(o["y"])
    return 0 if y < 0.37 else 2 if y > 0.63 else 1


def reading_order(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The objects top band first, left to right within a band (the order the captions list them in).

    The scene generator's object order is arbitrary; a caption that followed it would ask the model to
    guess which object comes first, which the image cannot tell: in reading order every word of the
    caption is determined by the image."""
    return sorted(objs, key=lambda o: (_band(o), float(o["x"]), float(o["y"])))


def describe_objects(scene: dict[str, Any]) -> str:
    """The short image-only answer: colour and shape of every object in reading order."""
    return ", ".join(f"{o['color']} {o['shape']}" for o in reading_order(list(scene["objects"])))


def describe_target(scene: dict[str, Any], i: int) -> str:
    o = scene["objects"][i]
    return f"the {_obj_phrase(o)} {_where(o)}"


# --------------------------------------------------------------------------------------------------
# examples
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    image: ImageRef
    prompt: str  # may contain <|image_1|>; if not, the image block goes first
    response: str
    kind: str
    record_id: str


def examples_from_record(rec: PairRecord, seed: int = 0) -> list[Example]:
    """The generative examples one PairRecord yields (possibly none, e.g. a text-only pair)."""
    out: list[Example] = []
    if rec.qry_image is not None and rec.pos_image is None and rec.pos_text.strip():
        out.append(Example(rec.qry_image, rec.qry_text, rec.pos_text.strip(), "pair", rec.id))
    scene = rec.meta.get("scene") if isinstance(rec.meta, dict) else None
    if isinstance(scene, dict):
        img = rec.qry_image if rec.qry_image is not None else rec.pos_image
        if img is not None:
            rng = random.Random(digest(f"{seed}:{rec.id}"))
            out.append(Example(img, rng.choice(CAPTION_PROMPTS), describe_scene(scene, rng), "caption", rec.id))
            n = len(scene.get("objects", []))
            out.append(Example(img, COUNT_PROMPT, str(n), "count", rec.id))
            out.append(Example(img, OBJECTS_PROMPT, describe_objects(scene), "objects", rec.id))
            target = rec.meta.get("target")
            if rec.qry_image is not None and isinstance(target, int) and 0 <= target < len(scene.get("objects", [])):
                out.append(Example(rec.qry_image, rec.qry_text, describe_target(scene, target), "grounding", rec.id))
    return out


def image_block(n_pad: int = 1) -> str:
    return "<|vision_start|>" + "<|image_pad|>" * n_pad + "<|vision_end|>"


def prompt_text(prompt: str) -> str:
    """The prompt with the image block in place of ``<|image_1|>`` (or first when there is none)."""
    if IMAGE_PLACEHOLDER in prompt:
        return prompt.replace(IMAGE_PLACEHOLDER, image_block(), 1).replace(IMAGE_PLACEHOLDER, "")
    return image_block() + prompt


def _resolve_data(data: str | Path) -> Path:
    from ..shards import is_dataset

    d = Path(data)
    if is_dataset(d / "original"):
        return d / "original"
    if is_dataset(d):
        return d
    raise RecordError(f"{d} holds no PairRecord shards: expected {d}/original/manifest.json (a scenes benchmark "
                      "root from `cocoa-data scenes`) or a dataset directory with manifest.json")


def data_key(data: str | Path | None, config: PretrainConfig) -> str:
    """Identifies the training data for the cache without reading it: the shard checksums of the
    manifest, or (embedded default) the scenes generator's source and the number of pairs."""
    if data is None:
        from ..sources import scenes

        return digest(canonical_json(["scenes", config.scenes_train, 0, digest(Path(scenes.__file__).read_bytes())]))
    from ..shards import read_manifest

    path = _resolve_data(data)
    m = read_manifest(path)
    if m.record_type != "PairRecord":
        raise RecordError(f"{path} holds {m.record_type} records; pre-training reads PairRecord shards (original/)")
    if not m.complete:
        raise RecordError(f"{path} is incomplete (its writer did not finish); regenerate it")
    return digest(canonical_json(["shards", [sh.sha256 for sh in m.shards]]))


def load_records(data: str | Path | None, config: PretrainConfig) -> tuple[list[PairRecord], Path | None]:
    """(records, image root): the PairRecords to pre-train on."""
    if data is None:
        from ..sources import scenes

        return list(scenes.iter_train_pairs(config.scenes_train, seed=0)), None
    from ..shards import open_dataset

    path = _resolve_data(data)
    data_key(data, config)  # validates the record type / completeness with a clear message
    return list(open_dataset(path, record_type="PairRecord")), path


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------
class _Batcher:
    """Turns examples into model inputs with the processor (the user path: it expands the image pads and
    returns ``mm_token_type_ids``); labels are -100 except on the response and the EOS token."""

    def __init__(self, processor, eos_token: str, max_length: int, image_root: Path | None) -> None:  # type: ignore[no-untyped-def]
        self.processor = processor
        self.tok = processor.tokenizer
        self.eos = eos_token
        self.max_length = max_length
        self.image_root = image_root

    def texts(self, ex: Example) -> tuple[str, str]:
        return prompt_text(ex.prompt) + "\n", ex.response + self.eos

    def __call__(self, examples: list[Example]) -> dict[str, Any]:
        import torch

        images = []
        for ex in examples:
            try:
                images.append(ex.image.load(self.image_root))
            except CocoaError as e:
                raise RecordError(f"record {ex.record_id}: {e}") from None
        pairs = [self.texts(ex) for ex in examples]
        batch = self.processor(text=[p + r for p, r in pairs], images=images, return_tensors="pt",
                               padding=True, padding_side="right")
        ids = batch["input_ids"]
        labels = torch.full_like(ids, -100)
        lengths = batch["attention_mask"].sum(1).tolist()
        for i, (_, resp) in enumerate(pairs):
            r = self.tok(resp, add_special_tokens=False)["input_ids"]
            end = int(lengths[i])
            if ids[i, end - len(r):end].tolist() != r:  # the response did not tokenize on its own boundary
                raise RecordError(f"record {examples[i].record_id}: response tokens not found at the end of the "
                                  "sequence (tokenizer boundary); report this with the record")
            labels[i, end - len(r):end] = ids[i, end - len(r):end]
        batch["labels"] = labels
        return dict(batch)

    def length(self, ex: Example, image_tokens: int) -> int:
        p, r = self.texts(ex)
        return len(self.tok(p + r, add_special_tokens=False)["input_ids"]) + image_tokens - 1


def _model_key(path: Path) -> str:
    files = [path / "config.json", path / "model.safetensors"]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise RecordError(f"--base {path} is not a saved model ({missing[0].name} missing); "
                          "pass a directory written by save_pretrained / cocoa-train tiny-model")
    from ..shards import sha256_file

    return digest(canonical_json([sha256_file(f) for f in files]))


def _settings(config: PretrainConfig) -> dict[str, Any]:
    keep = ("steps", "arch", "seed", "batch_size", "lr", "warmup", "weight_decay", "grad_clip", "max_length",
            "curriculum", "align_steps", "align_batch_size", "align_lr")
    return {k: getattr(config, k) for k in keep}


def pretrain(config: PretrainConfig, out_dir: str | Path, *, records: list[PairRecord] | None = None,
             image_root: Path | None = None, dkey: str = "", console: Any = None) -> Path:
    """Pre-train generatively and save to ``out_dir`` (which must not exist or be empty)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, get_cosine_schedule_with_warmup

    from ..model.spec import EmbeddingSpec
    from .build import tiny_model_dir

    out = Path(out_dir)
    from ..fs import has_content

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
            "pretrained": "generative", "pretrain_version": PRETRAIN_VERSION, **_settings(config),
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
            from ..fs import remove_owned_tree

            remove_owned_tree(out)  # empty or only cocoa's marker/lock (checked above)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _align(model, processor, kept: list[Example], image_root: Path | None, config: PretrainConfig,  # type: ignore[no-untyped-def]
           on_step) -> dict[str, Any]:
    """Contrastive alignment of the vision tower (:mod:`cocoa.tiny.vision_align`) on the image -> text
    examples (captions, text positives), scored on held-out scenes captions."""
    from .vision_align import ALIGN_KINDS, align_vision

    def pair(ex: Example, root: Path | None) -> tuple[Any, str]:
        return (lambda: ex.image.load(root)), ex.response

    pairs = [pair(ex, image_root) for ex in kept if ex.kind in ALIGN_KINDS and ex.response.strip()]
    if len(pairs) < 2:
        raise RecordError(f"vision alignment needs image -> text examples (captions or text positives); the data "
                          f"has {len(pairs)}. Pass --align-steps 0 to skip it")
    heldout = [pair(ex, None) for ex in heldout_examples() if ex.kind == "caption"][:64]
    return align_vision(model, processor, pairs, steps=config.align_steps, batch_size=config.align_batch_size,
                        lr=config.align_lr, seed=config.seed, heldout=heldout, on_step=on_step)


def _length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random,
                            group: int = 8) -> list[list[int]]:
    """One epoch of batches: shuffle, sort by length within groups of ``group`` batches (less padding),
    then shuffle the batches. Deterministic for a given ``rng`` state."""
    perm = list(range(len(lengths)))
    rng.shuffle(perm)
    if len(perm) < batch_size:  # tiny data: repeat it to fill a batch
        perm = (perm * (batch_size // max(1, len(perm)) + 1))[: batch_size]
    batches: list[list[int]] = []
    span = batch_size * group
    for g in range(0, len(perm), span):
        chunk = sorted(perm[g:g + span], key=lambda i: lengths[i])
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    batches = [b for b in batches if len(b) == batch_size] or batches
    rng.shuffle(batches)
    return batches


def response_loss(model, batch: dict[str, Any]):  # type: ignore[no-untyped-def]
    """Next-token cross-entropy on the labelled (response) positions only.

    Same value as the HF model's ``loss`` with these labels, but the LM head and softmax run on the
    response positions instead of the whole sequence (the prompt and the image tokens are most of it)."""
    import torch.nn.functional as F

    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.model(**inputs).last_hidden_state  # [B, L, D]
    target = labels[:, 1:]
    sel = target != -100
    logits = model.lm_head(hidden[:, :-1][sel])
    return F.cross_entropy(logits.float(), target[sel])


def heldout_examples(n_scenes: int = 96, seed: int = 7) -> list[Example]:
    """Held-out scenes examples (a generator seed the default training data never uses): the text-positive
    answers and the detailed captions, for :func:`image_gap`."""
    from ..sources import scenes

    return [ex for rec in scenes.iter_train_pairs(n_scenes, seed=seed) for ex in examples_from_record(rec)
            if ex.kind in ("pair", "caption", "objects")]


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


def _image_size(ref: ImageRef, root: Path | None) -> tuple[int, int]:
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(ref.read_bytes(root))) as im:
            return im.size
    except CocoaError:
        raise
    except Exception as e:
        raise RecordError(f"image {ref.path or '<embedded>'} cannot be read ({type(e).__name__}: {e})") from None


def _progress(enabled: bool, console: Any = None):  # type: ignore[no-untyped-def]
    from rich.progress import (BarColumn, MofNCompleteColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from ..progress import Progress  # a live bar on a terminal, plain lines in logs and pipes

    class _Rate(TaskProgressColumn):
        def render(self, task):  # type: ignore[no-untyped-def]
            from rich.text import Text

            return Text(f"{task.speed or 0:.2f} steps/s")

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"), _Rate(), TimeElapsedColumn(), TextColumn("ETA"),
        TimeRemainingColumn(), disable=not enabled, console=console, unit="steps",
    )


def cache_key(config: PretrainConfig, data_key: str) -> str:
    base_key = _model_key(Path(config.base)) if config.base else "tiny"
    return digest(canonical_json([PRETRAIN_VERSION, _settings(config), data_key, base_key]))[:16]


def pretrained_tiny_dir(data_dir: str | Path | None = None, steps: int = DEFAULT_STEPS, seed: int = 0,
                        *, console: Any = None, **settings: Any) -> Path:
    """The generatively pre-trained tiny model for this data and these settings, built once and cached
    under ``$COCOA_CACHE/pretrained/`` (keyed by the data manifest checksums + settings + base model).

    ``data_dir=None`` pre-trains on scenes training pairs generated in memory (the embedded default).
    Other keyword arguments are :class:`PretrainConfig` fields (``batch_size``, ``lr``, ``base``...)."""
    from .build import cache_root, cached_build, settings_key

    config = PretrainConfig.build({"data": str(data_dir) if data_dir is not None else None, "steps": steps,
                                   "seed": seed, **settings})
    dkey = data_key(config.data, config)
    if config.base is None:
        # the random-init base enters the key through the tiny builder's own settings key
        key = cache_key(config, dkey + ":" + settings_key(config.arch, seed=config.seed))
    else:
        key = cache_key(config, dkey)
    final = cache_root() / "pretrained" / f"tiny-{config.arch}-gen-{key}"

    def build(d: Path) -> Path:
        records, root = load_records(config.data, config)
        return pretrain(config, d, records=records, image_root=root, dkey=dkey, console=console)

    return cached_build(final, build)


def read_metrics(model_dir: str | Path, name: str = METRICS_FILE) -> list[dict[str, Any]]:
    """Rows of a saved model's per-step log (``METRICS_FILE``, or ``ALIGN_METRICS_FILE``)."""
    f = Path(model_dir) / name
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []


def loss_curve(model_dir: str | Path, every: int = 25) -> list[tuple[int, float]]:
    """(step, mean loss over the preceding ``every`` steps) from the saved metrics."""
    rows = read_metrics(model_dir)
    out = []
    for i in range(every, len(rows) + 1, every):
        chunk = rows[i - every:i]
        out.append((chunk[-1]["step"], sum(r["loss"] for r in chunk) / len(chunk)))
    return out


__all__ = ["PretrainConfig", "pretrain", "pretrained_tiny_dir", "describe_scene", "examples_from_record",
           "image_gap", "heldout_examples", "reading_order",
           "loss_curve", "read_metrics", "data_key", "load_records"]
