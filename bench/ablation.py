"""Does reconstruction raise the ceiling? CoCoA (stages 1,2,3) vs the contrastive-only baseline, at the plateau.

    python bench/ablation.py --root runs/ablation            # the whole plan (2 h 09 min on 2 idle cores; docs/results.md)
    python bench/ablation.py --root runs/abl-quick --quick   # every arm end to end at toy sizes (~2 min)
    python bench/ablation.py --root runs/ablation --plan     # the tasks and their commands, run nothing
    python bench/ablation.py --root runs/ablation --report-only --png docs/ablation_curves.png
    python bench/ablation.py --root runs/abl-fresh --val-seed 303 --test-seed 404   # the same plan on unseen splits

Design (docs/results.md says why each choice; every training step runs through cocoa's own CLI):

* **Data.** Four scenes builds with different seeds: the base's pre-training corpus (``pretrain/``, 4,000
  pairs), a fixed, modest set of training pairs (``train/``, 1,000 pairs: synthesised, curated against the
  test sets and mixed 1:1 for stages 1-2; its original pairs are stage 3's data), a **validation** split
  (``val/``: the five IND sets only) and a **test** split (``test/``: IND and OOD sets; the held-out colour x
  shape compositions appear only in OOD sets). Selection only ever reads validation; test is read once per
  run, at the checkpoint validation chose.
* **Stage 3 to its plateau.** Constant learning rate after a short warm-up, a checkpoint every
  ``--eval-every`` steps, each scored on validation while training goes on; training is stopped when
  ``--patience`` evaluations in a row have not beaten the best (early stopping), or at ``--s3-max-steps``.
  The best validation checkpoint is scored on test.
* **Tuning, equal effort.** The baseline's stage-3 learning rate is chosen from ``--s3-lrs`` on validation
  (seed 0); every arm then uses it. Stages 1-2 settings are chosen from as many configurations (full
  fine-tuning / DoRA adapters on the LLM and ViT projections / the ``strict`` stage-2 mask; MAE ratio 0.3)
  by the validation score of the 1,2,3 run they lead to (seed 0).
* **Arms** (3 seeds each, the chosen settings): stage 3 only, 1,2,3, 2,3 and 1,3. Stages 1-2 run as one
  ``cocoa-train --stages 1,2`` (adapters merged after each stage); the 1,3 arm's stage-3 input is that run's
  stage-1 model (the same seed gives the same stage 1), 2,3 runs stage 2 alone from the base.
* **Comparisons.** (a) equal stage-3 budget: each run's best-validation checkpoint (early stopping gives every
  arm the budget it can use); (b) equal total compute: the best validation checkpoint within
  ``s3_max_steps`` minus the stage-1/2 work in stage-3-step equivalents (sequences processed). Paired
  per-seed differences to the baseline.
* **The mechanism** (``bench/ablation_mechanism.py``) for the base, after stage 1, after stage 2 (and after
  stage 2 alone), before any contrastive step: zero-shot validation P@1 of the EOS embedding, a linear probe
  from the frozen EOS state to scene attributes, and stage 2's masked-B accuracy with each sample's own A
  versus with A (hence the EOS state B reads) taken from another sample.

Resumable: finished tasks are skipped (``result.json``), an interrupted training continues from its
checkpoint (``--resume auto``), evaluations are cached per checkpoint, a stopped run stays stopped.
Importable without polars/datasets (only the cocoa commands it runs import them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

META_TASKS = ("classification", "vqa", "retrieval", "grounding")
SPLITS = ("IND", "OOD")
COLUMNS = ("overall", *META_TASKS, *SPLITS)
S3_MAX_LENGTH = 256  # cocoa-train --preset tiny's stage-3 max_length (the spec a stage-3 model is saved with)
IND_SETS = "SceneCls,SceneVQA,SceneT2I,SceneI2T,SceneGround"

# arm -> (stages, label)
ARMS: dict[str, tuple[str, str]] = {
    "s3": ("3", "stage 3 only (baseline)"),
    "s123": ("1,2,3", "stages 1,2,3 (CoCoA)"),
    "s23": ("2,3", "stages 2,3"),
    "s13": ("1,3", "stages 1,3"),
}


@dataclass
class PreConfig:
    """Settings of stages 1-2 (one configuration of the sweep)."""

    method: str = "full"  # full | dora | lora (cocoa-train --lora-method)
    s1_lr: float = 1e-4
    s2_lr: float = 3e-4
    mask_variant: str = "paper"  # stage-2 mask: paper | strict
    label: str = ""


DEFAULT_CONFIGS = {
    "full": PreConfig("full", 1e-4, 3e-4, "paper", "full fine-tuning, paper mask"),
    "full-strict": PreConfig("full", 1e-4, 3e-4, "strict", "full fine-tuning, strict mask"),
    "dora": PreConfig("dora", 3e-4, 1e-3, "paper", "DoRA r=8 alpha=64 on LLM + ViT projections, paper mask"),
}


@dataclass
class Settings:
    """Everything that determines the experiment's numbers (saved as ROOT/settings.json)."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    image_size: int = 112
    # data
    train_pairs: int = 1000
    train_seed: int = 0
    pretrain_pairs: int = 4000
    pretrain_seed: int = 7
    val_per_task: int = 100
    val_seed: int = 101
    test_per_task: int = 200
    test_seed: int = 202
    distractors: int = 49
    # the base (generative pre-training of the tiny MLLM on its own corpus)
    pretrain_steps: int = 400
    extra_pretrain_args: list[str] = field(default_factory=list)
    # stage 3
    s3_lrs: list[float] = field(default_factory=lambda: [1e-4, 3e-4, 1e-3])
    s3_max_steps: int = 1600  # the 2026-12-02 run: 800 cut runs still rising; one of 15 runs reached 1,600
    s3_batch: int = 32
    s3_warmup_steps: int = 10
    eval_every: int = 100
    patience: int = 2
    # stages 1-2
    s1_steps: int = 200
    s2_steps: int = 200
    s12_batch: int = 16
    mae_ratio: float = 0.3
    text_mask_ratio: float = 0.2
    b_mask_ratio: float = 0.7
    lora_r: int = 8
    lora_alpha: float = 64.0
    configs: dict[str, dict[str, Any]] = field(default_factory=lambda: {k: asdict(v) for k, v in DEFAULT_CONFIGS.items()})
    # evaluation and the mechanism probes
    eval_batch: int = 32
    probe_train: int = 1000
    probe_val: int = 500
    swap_records: int = 192
    extra_train_args: list[str] = field(default_factory=list)

    def check(self) -> None:
        bad = [a for a in self.arms if a not in ARMS]
        if bad or "s3" not in self.arms:
            raise SystemExit(f"--arms must include s3 (the baseline) and name known arms ({', '.join(ARMS)}); got {self.arms}")
        if self.s3_max_steps % self.eval_every:
            raise SystemExit(f"--s3-max-steps {self.s3_max_steps} must be a multiple of --eval-every {self.eval_every}")
        if not self.s3_lrs or not self.configs:
            raise SystemExit("give at least one stage-3 learning rate and one stage 1-2 configuration")
        if self.patience < 1:
            raise SystemExit("--patience must be >= 1")
        split_seeds = {"pretrain": self.pretrain_seed, "train": self.train_seed, "val": self.val_seed, "test": self.test_seed}
        if len(set(split_seeds.values())) < len(split_seeds):
            raise SystemExit("the four scenes builds need four different seeds (--pretrain-seed, --train-seed, --val-seed, "
                             f"--test-seed); got {split_seeds}")
        for name, c in self.configs.items():
            PreConfig(**c)  # raises on unknown keys
            if c["method"] not in ("full", "dora", "lora") or c["mask_variant"] not in ("paper", "strict"):
                raise SystemExit(f"configuration {name}: method must be full|dora|lora and mask_variant paper|strict")

    def pre_cost(self, stages: str) -> int:
        """Stage 1-2 work in stage-3-step equivalents (sequences processed: a stage-3 step embeds a query and a
        target per sample, a stage-1/2 step one sequence per sample), rounded up to a checkpoint interval."""
        seqs = (self.s1_steps if "1" in stages else 0) * self.s12_batch + (self.s2_steps if "2" in stages else 0) * self.s12_batch
        steps = seqs / (2 * self.s3_batch)
        return int(math.ceil(steps / self.eval_every) * self.eval_every) if steps else 0


QUICK = dict(seeds=[0, 1], train_pairs=120, pretrain_pairs=160, val_per_task=4, test_per_task=4, distractors=7,
             pretrain_steps=6, extra_pretrain_args=["--align-steps", "2", "--align-batch-size", "8"],
             s3_lrs=[3e-4, 1e-3], s3_max_steps=6, s3_batch=8, s3_warmup_steps=1, eval_every=2, patience=1,
             s1_steps=2, s2_steps=2, s12_batch=4, probe_train=40, probe_val=20, swap_records=8,
             configs={k: asdict(DEFAULT_CONFIGS[k]) for k in ("full", "dora")})


# ---------------------------------------------------------------------------------------------------
# paths and small helpers
# ---------------------------------------------------------------------------------------------------
class Paths:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.pretrain = root / "scenes-pretrain"  # the base's corpus
        self.train = root / "scenes-train"  # the fixed training pairs (original/)
        self.val = root / "scenes-val"  # validation: IND sets
        self.test = root / "scenes-test"  # test: IND + OOD sets
        self.data = root / "data"  # cocoa workspace: original/, synthetic/, curated/, mix/
        self.base = root / "base"
        self.runs = root / "runs"
        self.mech = root / "mechanism"
        self.logs = root / "logs"
        self.settings = root / "settings.json"
        self.choices = root / "choices.json"
        self.report_json = root / "report.json"
        self.report_md = root / "report.md"
        self.commands = root / "commands.sh"


def now() -> str:
    return time.strftime("%H:%M:%S")


def log(msg: str) -> None:
    print(f"[{now()}] {msg}", flush=True)


def bin_env(threads: int | None = None) -> dict[str, str]:
    """The environment for child commands: the venv's bin first on PATH, torch threads pinned."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if threads:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[k] = str(threads)
    return env


def record_command(paths: Paths, cmd: list[str], note: str = "") -> None:
    paths.root.mkdir(parents=True, exist_ok=True)
    with open(paths.commands, "a") as f:
        f.write((f"# {note}\n" if note else "") + shlex.join(cmd) + "\n")


def sh(paths: Paths, cmd: list[str], log_file: Path, *, threads: int | None = None, note: str = "") -> float:
    """Run one CLI command (logged), output to ``log_file``; raise with the log's tail on failure."""
    record_command(paths, cmd, note)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_file, "a") as out:
        out.write(f"\n$ {shlex.join(cmd)}\n")
        out.flush()
        rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=bin_env(threads), stdin=subprocess.DEVNULL)
    if rc != 0:
        tail = log_file.read_text(errors="replace").splitlines()[-25:]
        raise SystemExit(f"command failed (exit {rc}): {shlex.join(cmd)}\nlog {log_file}:\n" + "\n".join(tail))
    return time.time() - t0


def complete(path: Path) -> bool:
    m = path / "manifest.json"
    try:
        return m.is_file() and bool(json.loads(m.read_text()).get("complete"))
    except (OSError, json.JSONDecodeError):
        return False


def atomic_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def load_avg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


# ---------------------------------------------------------------------------------------------------
# preparation: the four scenes builds, the training workspace, the base
# ---------------------------------------------------------------------------------------------------
def prepare(paths: Paths, st: Settings, threads: int) -> dict[str, float]:
    t: dict[str, float] = {}
    lg = paths.logs / "prepare.log"
    builds = [
        (paths.pretrain, st.pretrain_pairs, 0, st.pretrain_seed, None, "the base's pre-training corpus"),
        (paths.train, st.train_pairs, 0, st.train_seed, None, "the fixed training pairs"),
        (paths.val, 0, st.val_per_task, st.val_seed, IND_SETS, "validation: IND sets only"),
        (paths.test, 0, st.test_per_task, st.test_seed, None, "test: IND and OOD sets"),
    ]
    for root, n_train, per_task, seed, sets, note in builds:
        if (root / "benchmark.json").is_file():
            continue
        cmd = ["cocoa-data", "scenes", "--out", str(root), "--train", str(n_train), "--eval-per-task", str(per_task),
               "--distractors", str(st.distractors), "--seed", str(seed), "--image-size", str(st.image_size)]
        if sets or not per_task:
            cmd += ["--datasets", sets or "SceneCls"]
        t[f"scenes:{root.name}"] = sh(paths, cmd, lg, threads=threads, note=note)
    t["synth"] = sh(paths, ["cocoa-data", "synth", "--source", "scenes", "--scenes-dir", str(paths.train),
                            "--out", str(paths.data), "--no-progress"], lg, threads=threads,
                    note="teacher captions + QA for every training image")
    if not complete(paths.data / "mix"):
        t["curate"] = sh(paths, ["cocoa-data", "curate", "--data", str(paths.data), "--eval-data",
                                 str(paths.test / "eval"), "--no-progress"], lg, threads=threads,
                         note="filter, dedupe, decontaminate against the test sets")
        t["mix"] = sh(paths, ["cocoa-data", "mix", "--ratio", "1:1", "--data", str(paths.data), "--no-progress"],
                      lg, threads=threads, note="original:synthetic 1:1 (stages 1-2)")
    if not (paths.base / "cocoa.json").is_file():
        t["pretrain"] = sh(paths, ["cocoa-train", "pretrain-tiny", "--data", str(paths.pretrain), "--steps",
                                   str(st.pretrain_steps), "--out", str(paths.base), "--no-progress",
                                   *st.extra_pretrain_args], lg, threads=threads,
                           note="generative pre-training of the tiny MLLM on its own corpus")
    return t


# ---------------------------------------------------------------------------------------------------
# tasks
# ---------------------------------------------------------------------------------------------------
@dataclass
class Task:
    name: str
    kind: str  # pre | s3 | mech
    deps: list[str]
    info: dict[str, Any]


def fmt_lr(lr: float) -> str:
    return f"{lr:g}"


def pre_name(cfg: str, stages: str, seed: int) -> str:
    return f"pre-{cfg}-{stages.replace(',', '')}-seed{seed}"


def s3_name(arm: str, cfg: str | None, lr: float, seed: int) -> str:
    return f"{arm}{'-' + cfg if cfg and arm != 's3' else ''}-lr{fmt_lr(lr)}-seed{seed}"


def pre_command(paths: Paths, st: Settings, cfg_name: str, stages: str, seed: int) -> list[str]:
    c = PreConfig(**st.configs[cfg_name])
    out = paths.runs / pre_name(cfg_name, stages, seed) / "train"
    cmd = ["cocoa-train", "--stages", stages, "--data", str(paths.data), "--model", str(paths.base),
           "--preset", "tiny", "--out", str(out), "--seed", str(seed), "--no-progress", "--log-every", "10",
           "--resume", "auto", "--lora-method", c.method]
    if c.method != "full":
        cmd += ["--lora-r", str(st.lora_r), "--lora-alpha", f"{st.lora_alpha:g}", "--lora-train-vision"]
    for k, steps, lr in (("1", st.s1_steps, c.s1_lr), ("2", st.s2_steps, c.s2_lr)):
        if k in stages:
            cmd += [f"--stage{k}-steps", str(steps), f"--stage{k}-batch-size", str(st.s12_batch),
                    f"--stage{k}-micro-batch-size", str(st.s12_batch), f"--stage{k}-lr", fmt_lr(lr),
                    f"--stage{k}-schedule", "constant", f"--stage{k}-warmup-ratio", "0.05",
                    f"--stage{k}-save-every", str(max(1, steps // 2))]
    if "1" in stages:
        cmd += ["--stage1-image-mask-ratio", f"{st.mae_ratio:g}", "--stage1-text-mask-ratio", f"{st.text_mask_ratio:g}"]
    if "2" in stages:
        cmd += ["--stage2-mask-variant", c.mask_variant, "--stage2-b-mask-ratio", f"{st.b_mask_ratio:g}"]
    return cmd + list(st.extra_train_args)


def s3_command(paths: Paths, st: Settings, name: str, input_model: Path, lr: float, seed: int) -> list[str]:
    cmd = ["cocoa-train", "--stages", "3", "--data", str(paths.data), "--model", str(input_model),
           "--preset", "tiny", "--out", str(paths.runs / name / "train"), "--seed", str(seed), "--no-progress",
           "--log-every", "10", "--resume", "auto", "--lora-method", "full", "--keep-checkpoints", "100000",
           "--stage3-steps", str(st.s3_max_steps), "--stage3-batch-size", str(st.s3_batch),
           "--stage3-micro-batch-size", str(st.s3_batch), "--no-stage3-grad-cache", "--stage3-lr", fmt_lr(lr),
           "--stage3-schedule", "constant", "--stage3-warmup-ratio", f"{st.s3_warmup_steps / st.s3_max_steps:.6g}",
           "--stage3-save-every", str(st.eval_every)]
    return cmd + list(st.extra_train_args)


def stage3_input(paths: Paths, arm: str, cfg: str | None, seed: int) -> tuple[Path, str | None]:
    """The model stage 3 starts from, and the pre-task that makes it."""
    if arm == "s3":
        return paths.base, None
    if arm == "s23":
        n = pre_name(cfg, "2", seed)
        return paths.runs / n / "train" / "stage2" / "model", n
    n = pre_name(cfg, "1,2", seed)
    return paths.runs / n / "train" / ("stage1" if arm == "s13" else "stage2") / "model", n


def plan_tasks(paths: Paths, st: Settings, choices: dict[str, Any]) -> list[Task]:
    """Every task known so far: the two sweeps (seed 0) always; the main arms once both choices are made (a sweep of
    one value is made before it runs)."""
    tasks: dict[str, Task] = {}

    def add_s3(arm: str, cfg: str | None, lr: float, seed: int) -> None:
        name = s3_name(arm, cfg, lr, seed)
        model, pre = stage3_input(paths, arm, cfg, seed)
        if pre and pre not in tasks:
            stages = "2" if arm == "s23" else "1,2"
            tasks[pre] = Task(pre, "pre", [], {"cfg": cfg, "stages": stages, "seed": seed})
        tasks.setdefault(name, Task(name, "s3", [pre] if pre else [],
                                    {"arm": arm, "cfg": cfg, "lr": lr, "seed": seed, "input": str(model)}))

    s0 = st.seeds[0]
    for lr in st.s3_lrs:  # stage-3 lr of the baseline, on validation
        add_s3("s3", None, lr, s0)
    for c in st.configs:  # stage-1/2 configurations (their stage 1,2 runs start at once)
        n = pre_name(c, "1,2", s0)
        tasks.setdefault(n, Task(n, "pre", [], {"cfg": c, "stages": "1,2", "seed": s0}))
    # a sweep of one is decided before it runs: what waits on its choice can start at once
    lr = choices.get("s3_lr", st.s3_lrs[0] if len(st.s3_lrs) == 1 else None)
    cfg = choices.get("config", next(iter(st.configs)) if len(st.configs) == 1 else None)
    if cfg is not None:  # the configuration's stage 1-2 runs need no stage-3 lr
        for seed in st.seeds:
            for stages in ("1,2", "2") if "s23" in st.arms else ("1,2",):  # 1,2: every seed's mechanism reads it
                n = pre_name(cfg, stages, seed)
                tasks.setdefault(n, Task(n, "pre", [], {"cfg": cfg, "stages": stages, "seed": seed}))
    if lr is not None:
        for c in st.configs:
            add_s3("s123", c, lr, s0)
        if "s3" in st.arms:  # the baseline's other seeds need only the lr: they fill idle slots during the config sweep
            for seed in st.seeds:
                add_s3("s3", None, lr, seed)
    if lr is not None and cfg is not None:
        for seed in st.seeds:
            for arm in st.arms:
                add_s3(arm, cfg, lr, seed)
            # the mechanism, per seed: base, after stage 1, after stage 2, after stage 2 alone
            deps = [pre_name(cfg, "1,2", seed)] + ([pre_name(cfg, "2", seed)] if "s23" in st.arms else [])
            m = f"mech-seed{seed}"
            tasks.setdefault(m, Task(m, "mech", deps, {"cfg": cfg, "seed": seed}))
    return list(tasks.values())


def choose(paths: Paths, st: Settings) -> dict[str, Any]:
    """The sweeps' choices, made from validation scores only, as soon as their runs have finished."""
    ch = read_json(paths.choices) or {}
    s0 = st.seeds[0]
    if "s3_lr" not in ch:
        res = {lr: read_json(paths.runs / s3_name("s3", None, lr, s0) / "result.json") for lr in st.s3_lrs}
        if all(res.values()):
            best = max(st.s3_lrs, key=lambda lr: (res[lr]["best"]["val"], -lr))
            ch["s3_lr"] = best
            ch["s3_lr_sweep"] = {fmt_lr(lr): res[lr]["best"]["val"] for lr in st.s3_lrs}
            log(f"chosen stage-3 lr {fmt_lr(best)} (validation P@1 {ch['s3_lr_sweep']})")
            atomic_json(paths.choices, ch)
    if "s3_lr" in ch and "config" not in ch:
        res = {c: read_json(paths.runs / s3_name("s123", c, ch["s3_lr"], s0) / "result.json") for c in st.configs}
        if all(res.values()):
            order = list(st.configs)
            best = max(order, key=lambda c: (res[c]["best"]["val"], -order.index(c)))
            ch["config"] = best
            ch["config_sweep"] = {c: res[c]["best"]["val"] for c in order}
            log(f"chosen stage 1-2 configuration {best} (validation P@1 of its 1,2,3 run {ch['config_sweep']})")
            atomic_json(paths.choices, ch)
    return ch


# ---------------------------------------------------------------------------------------------------
# evaluation of checkpoints
# ---------------------------------------------------------------------------------------------------
_SETS: dict[str, Any] = {}


def eval_model(model_dir: Path, split_root: Path, st: Settings, out: Path) -> dict[str, Any]:
    """Score a model directory on one split (cached in ``out/results.json``); returns the flat scores."""
    res = out / "results.json"
    if not res.is_file():
        from cocoa.eval import evaluate
        from cocoa.eval.evaluator import load_sets

        key = str(split_root)
        if key not in _SETS:  # read each split (and its images) once per process
            _SETS[key] = load_sets("scenes", data=str(split_root))
        evaluate(str(model_dir), "scenes", out=str(out), cache=False, sets=_SETS[key], batch_size=st.eval_batch,
                 device="cpu", dtype="float32", plot=False, quiet=True)
    return flat(json.loads(res.read_text()))


def flat(r: dict[str, Any]) -> dict[str, Any]:
    out = {"overall": r.get("overall")}
    out.update({m: (r.get("meta_tasks") or {}).get(m) for m in META_TASKS})
    out.update({s: (r.get("splits") or {}).get(s) for s in SPLITS})
    out["datasets"] = {n: d["p_at_1"] for n, d in (r.get("datasets") or {}).items()}
    out["chance"] = (sum(1.0 / d["n_candidates"] for d in (r.get("datasets") or {}).values() if d.get("n_candidates"))
                     / max(1, len(r.get("datasets") or {})))
    return out


def materialize(ckpt: Path, input_model: Path, dest: Path) -> Path:
    """A model directory from a stage-3 checkpoint: the input model's architecture, processor and embedding
    spec (with the attention stage 3 trains and pools with) and the checkpoint's weights. Stage 3 here is full
    fine-tuning, so ``weights.safetensors`` holds the whole model under ``CocoaModel`` names."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from cocoa.model.spec import EmbeddingSpec

    if (dest / "model.safetensors").is_file():
        return dest
    weights = load_file(str(ckpt / "weights.safetensors"))
    sd = {k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")}
    if len(sd) != len(weights):
        raise SystemExit(f"{ckpt}: unexpected parameter names (not a full fine-tuning checkpoint of CocoaModel)")
    hf = AutoModelForImageTextToText.from_pretrained(str(input_model), dtype=torch.float32)
    got = hf.load_state_dict(sd, strict=False)
    tied = {"lm_head.weight"} if getattr(getattr(hf.config, "text_config", hf.config), "tie_word_embeddings",
                                         getattr(hf.config, "tie_word_embeddings", False)) else set()
    if got.unexpected_keys or set(got.missing_keys) - tied:
        raise SystemExit(f"{ckpt} does not fit {input_model}: missing {got.missing_keys[:3]}, unexpected "
                         f"{got.unexpected_keys[:3]}")
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(str(tmp))
    for f in input_model.iterdir():  # processor and tokenizer files
        if f.is_file() and not f.name.startswith("model") and f.name not in ("config.json", "generation_config.json",
                                                                              "cocoa.json"):
            shutil.copy2(f, tmp / f.name)
    # the spec cocoa-train writes for the finished stage-3 model (tests/test_ablation.py checks they agree)
    spec = EmbeddingSpec.load(input_model)
    spec = spec.model_copy(update={"attention": "bidirectional", "max_length": S3_MAX_LENGTH,
                                   "stages": sorted({*spec.stages, 3})})
    spec.save(tmp)
    os.replace(tmp, dest)
    return dest


def checkpoints(run: Path) -> dict[int, Path]:
    d = run / "train" / "stage3" / "checkpoints"
    return {int(p.name.split("-")[1]): p for p in d.glob("step-*") if (p / "state.json").is_file()} if d.is_dir() else {}


def best_step(curve: dict[int, float], limit: int | None = None) -> int:
    """The step with the highest validation score (ties: the earliest), among steps <= ``limit``."""
    steps = sorted(s for s in curve if limit is None or s <= limit)
    return max(steps, key=lambda s: (curve[s], -s))


def should_stop(curve: dict[int, float], patience: int) -> bool:
    """Early stopping: the last ``patience`` evaluations did not beat the best before them."""
    steps = sorted(curve)
    if len(steps) <= patience:
        return False
    before = max(curve[s] for s in steps[:-patience])
    return all(curve[s] <= before for s in steps[-patience:])


def s3_worker(paths: Paths, st: Settings, task: Task, threads: int) -> dict[str, Any]:
    """Train stage 3 (a subprocess), scoring each checkpoint on validation as it appears; stop early; score the
    chosen checkpoints on test; write result.json."""
    run = paths.runs / task.name
    result_file = run / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    import torch

    torch.set_num_threads(threads)
    i = task.info
    input_model = Path(i["input"])
    cmd = s3_command(paths, st, task.name, input_model, i["lr"], i["seed"])
    stopped_file = run / "stopped.json"
    finished = (run / "train" / "stage3" / "summary.json").is_file()
    proc = None
    t0 = time.time()
    if not stopped_file.is_file() and not finished:
        record_command(paths, cmd, f"stage 3 of {task.name}")
        lf = open(paths.logs / f"{task.name}.train.log", "a")
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=bin_env(threads),
                                stdin=subprocess.DEVNULL, start_new_session=True)
    curve: dict[int, float] = {}
    val_steps = list(range(0, st.s3_max_steps + 1, st.eval_every))
    stop_at = None
    t_eval = 0.0
    try:
        while True:
            alive = proc is not None and proc.poll() is None
            ck = checkpoints(run)
            progressed = False
            for s in val_steps:
                if s in curve:
                    continue
                if s == 0:
                    model = input_model
                elif s in ck:
                    model = materialize(ck[s], input_model, run / "models" / f"step-{s:06d}")
                else:
                    break  # in order: wait for this checkpoint
                te = time.time()
                curve[s] = eval_model(model, paths.val, st, run / "evals" / f"val-step-{s:06d}")["overall"]
                t_eval += time.time() - te
                progressed = True
                log(f"{task.name}: step {s:>5} validation P@1 {curve[s]:.4f}")
                if should_stop(curve, st.patience):
                    stop_at = s
                    break
            if stop_at is not None:
                if proc is not None and proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
                    try:
                        proc.wait(60)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
                atomic_json(stopped_file, {"step": stop_at, "reason": f"no validation gain in {st.patience} evaluations"})
                break
            if len(curve) == len(val_steps) or (stopped_file.is_file() and not progressed):
                break
            if not alive and not progressed:
                if proc is not None and proc.returncode not in (0, None):
                    raise SystemExit(f"{task.name}: cocoa-train failed (exit {proc.returncode}); see "
                                     f"{paths.logs / (task.name + '.train.log')}")
                if not [s for s in val_steps if s not in curve and (s in checkpoints(run))]:
                    if proc is None and not finished and not stopped_file.is_file():
                        raise SystemExit(f"{task.name}: no training process and no checkpoints left to score")
                    break
            if not progressed:
                time.sleep(3)
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    t_train = time.time() - t0 - t_eval
    stopped = read_json(stopped_file)
    # (a) the best validation checkpoint; (b) the best within the equal-compute limit
    stages = ARMS[i["arm"]][0]
    limit = st.s3_max_steps - st.pre_cost(stages)
    picks = {"a": best_step(curve), "b": best_step(curve, limit)}
    tests: dict[int, dict[str, Any]] = {}
    ck = checkpoints(run)
    for s in sorted(set(picks.values())):
        model = input_model if s == 0 else materialize(ck[s], input_model, run / "models" / f"step-{s:06d}")
        tests[s] = eval_model(model, paths.test, st, run / "evals" / f"test-step-{s:06d}")
    seconds = {"wall": round(time.time() - t0, 1), "eval": round(t_eval, 1), "train": round(t_train, 1)}
    summ = read_json(run / "train" / "stage3" / "summary.json")
    if summ:
        seconds["stage3"] = summ.get("seconds")
    result = {"name": task.name, **i, "stages": stages, "command": shlex.join(cmd),
              "val_curve": {str(k): v for k, v in sorted(curve.items())}, "stopped": stopped,
              "best": {"step": picks["a"], "val": curve[picks["a"]], "test": tests[picks["a"]]},
              "equal_compute": {"limit": limit, "step": picks["b"], "val": curve[picks["b"]], "test": tests[picks["b"]]},
              "step0_val": curve.get(0), "seconds": seconds, "load_avg": load_avg()}
    atomic_json(result_file, result)
    shutil.rmtree(run / "train" / "stage3" / "checkpoints", ignore_errors=True)
    shutil.rmtree(run / "models", ignore_errors=True)
    return result


def pre_worker(paths: Paths, st: Settings, task: Task, threads: int) -> dict[str, Any]:
    out = paths.runs / task.name
    res = out / "result.json"
    if res.is_file():
        return json.loads(res.read_text())
    i = task.info
    cmd = pre_command(paths, st, i["cfg"], i["stages"], i["seed"])
    dt = sh(paths, cmd, paths.logs / f"{task.name}.log", threads=threads, note=f"stages {i['stages']} of {task.name}")
    summ = {}
    for k in i["stages"].split(","):
        s = read_json(out / "train" / f"stage{k}" / "summary.json") or {}
        summ[f"stage{k}"] = {key: s.get(key) for key in ("seconds", "steps", "final_loss", "loss_first", "loss_last")
                             if key in s} | {"summary": s}
        shutil.rmtree(out / "train" / f"stage{k}" / "checkpoints", ignore_errors=True)
    r = {"name": task.name, **i, "command": shlex.join(cmd), "seconds": round(dt, 1), "stages_summary": summ}
    atomic_json(res, r)
    return r


def mech_worker(paths: Paths, st: Settings, task: Task, threads: int) -> dict[str, Any]:
    out = paths.mech / f"seed{task.info['seed']}.json"
    if out.is_file():
        return json.loads(out.read_text())
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import ablation_mechanism as M

    cfg, seed = task.info["cfg"], task.info["seed"]
    models = {"base": paths.base, "stage 1": stage3_input(paths, "s13", cfg, seed)[0],
              "stages 1,2": stage3_input(paths, "s123", cfg, seed)[0]}
    if "s23" in st.arms:
        models["stage 2 alone"] = stage3_input(paths, "s23", cfg, seed)[0]
    res = M.measure_all(models, train_root=paths.train, val_seed=st.val_seed, mix=paths.data / "mix",
                        n_probe_train=st.probe_train, n_probe_val=st.probe_val, n_swap=st.swap_records,
                        b_mask_ratio=st.b_mask_ratio, seed=seed, image_size=st.image_size,
                        cache=paths.mech / f"seed{seed}", variant=PreConfig(**st.configs[cfg]).mask_variant)
    atomic_json(out, {"seed": seed, "config": cfg, "models": {k: str(v) for k, v in models.items()}, **res})
    return json.loads(out.read_text())


WORKERS: dict[str, Callable[..., dict[str, Any]]] = {"pre": pre_worker, "s3": s3_worker, "mech": mech_worker}


def task_done(paths: Paths, t: Task) -> bool:
    if t.kind == "mech":
        return (paths.mech / f"seed{t.info['seed']}.json").is_file()
    return (paths.runs / t.name / "result.json").is_file()


# ---------------------------------------------------------------------------------------------------
# scheduling: a small DAG; tasks appear as the sweeps' choices are made
# ---------------------------------------------------------------------------------------------------
def schedule(paths: Paths, st: Settings, jobs: int, threads: int, plan: bool = False) -> None:
    me = [sys.executable, str(Path(__file__).resolve()), "--root", str(paths.root), "--threads", str(threads)]
    running: dict[str, tuple[subprocess.Popen, float, Any]] = {}
    failed: list[str] = []
    priority = {"pre": 0, "s3": 1, "mech": 2}
    while True:
        ch = choose(paths, st)
        tasks = plan_tasks(paths, st, ch)
        if plan:
            for t in tasks:
                cmd = (pre_command(paths, st, t.info["cfg"], t.info["stages"], t.info["seed"]) if t.kind == "pre" else
                       s3_command(paths, st, t.name, Path(t.info["input"]), t.info["lr"], t.info["seed"])
                       if t.kind == "s3" else ["(python) bench/ablation_mechanism.py measure_all", t.name])
                print(f"# {t.name} (after {', '.join(t.deps) or 'preparation'})\n$ {shlex.join(cmd)}")
            if "s3_lr" not in ch:
                print("# then: the chosen stage-3 lr's 1,2,3 runs of each configuration; then every arm x seed "
                      "with the chosen lr and configuration, and the mechanism per seed")
            return
        done = {t.name for t in tasks if task_done(paths, t)}
        ready = sorted((t for t in tasks if t.name not in done and t.name not in running and t.name not in failed
                        and all(d in done for d in t.deps)), key=lambda t: (priority[t.kind], t.info.get("seed", 0)))
        while ready and len(running) < jobs:
            t = ready.pop(0)
            lf = open(paths.logs / f"{t.name}.worker.log", "a")
            p = subprocess.Popen(me + ["--worker", t.name], stdout=lf, stderr=subprocess.STDOUT,
                                 env=bin_env(threads), stdin=subprocess.DEVNULL)
            running[t.name] = (p, time.time(), lf)
            log(f"started {t.name} (pid {p.pid})")
        if not running:
            pending = [t.name for t in tasks if t.name not in done]
            if failed:
                raise SystemExit(f"{len(failed)} task(s) failed: {', '.join(failed)}; rerun the same command to retry")
            if pending:
                raise SystemExit(f"stuck: {', '.join(pending)} wait for tasks that cannot run")
            if "config" in ch:
                return
            raise SystemExit("the sweeps finished without a choice (see choices.json)")
        time.sleep(2)
        for name, (p, t0, lf) in list(running.items()):
            if p.poll() is None:
                continue
            lf.close()
            del running[name]
            if p.returncode == 0:
                log(f"finished {name} in {time.time() - t0:.0f}s")
            else:
                failed.append(name)
                log(f"FAILED {name} (exit {p.returncode}); see {paths.logs / (name + '.worker.log')}")


def run_worker(paths: Paths, st: Settings, name: str, threads: int) -> None:
    ch = read_json(paths.choices) or {}
    tasks = {t.name: t for t in plan_tasks(paths, st, ch)}
    if name not in tasks:
        raise SystemExit(f"no task {name} in this experiment")
    t = tasks[name]
    WORKERS[t.kind](paths, st, t, threads)


# ---------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------
def mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def main_runs(paths: Paths, st: Settings, ch: dict[str, Any]) -> dict[str, dict[int, dict[str, Any]]]:
    out: dict[str, dict[int, dict[str, Any]]] = {}
    if "s3_lr" not in ch or "config" not in ch:
        return out
    for arm in st.arms:
        for seed in st.seeds:
            r = read_json(paths.runs / s3_name(arm, ch["config"], ch["s3_lr"], seed) / "result.json")
            if r:
                out.setdefault(arm, {})[seed] = r
    return out


def build_report(paths: Paths, st: Settings) -> dict[str, Any]:
    ch = read_json(paths.choices) or {}
    res = main_runs(paths, st, ch)
    rep: dict[str, Any] = {"settings": asdict(st), "choices": ch, "machine": machine(), "arms": {},
                           "comparisons": {}, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    rep["timings"] = read_json(paths.root / "timings.json")
    sweeps: dict[str, Any] = {"s3_lr": {}, "config": {}}
    for lr in st.s3_lrs:
        r = read_json(paths.runs / s3_name("s3", None, lr, st.seeds[0]) / "result.json")
        if r:
            sweeps["s3_lr"][fmt_lr(lr)] = {"val": r["best"]["val"], "step": r["best"]["step"], "curve": r["val_curve"]}
    if "s3_lr" in ch:
        for c in st.configs:
            r = read_json(paths.runs / s3_name("s123", c, ch["s3_lr"], st.seeds[0]) / "result.json")
            if r:
                sweeps["config"][c] = {"val": r["best"]["val"], "step": r["best"]["step"], "curve": r["val_curve"]}
    rep["sweeps"] = sweeps
    for view, key in (("equal_stage3_budget", "best"), ("equal_total_compute", "equal_compute")):
        table, diffs = {}, {}
        base = res.get("s3", {})
        for arm, runs in res.items():
            cols = {c: mean_std([r[key]["test"][c] for r in runs.values()]) for c in COLUMNS}
            table[arm] = {"n": len(runs), "steps": [runs[s][key]["step"] for s in sorted(runs)],
                          "val": mean_std([r[key]["val"] for r in runs.values()]),
                          **{c: {"mean": m, "std": s} for c, (m, s) in cols.items()}}
            if arm != "s3":
                d = [runs[s][key]["test"]["overall"] - base[s]["best"]["test"]["overall"] for s in runs if s in base]
                m, sd = mean_std(d)
                diffs[arm] = {"mean": m, "std": sd, "n": len(d), "wins": sum(x > 0 for x in d), "per_seed": d}
        rep["comparisons"][view] = table
        rep["comparisons"][view + "_vs_baseline"] = diffs
    for arm, runs in res.items():
        steps = sorted({int(k) for r in runs.values() for k in r["val_curve"]})
        rep["arms"][arm] = {
            "stages": ARMS[arm][0], "label": ARMS[arm][1], "seeds": sorted(runs),
            "val_curve": {s: mean_std([r["val_curve"].get(str(s)) for r in runs.values()]) for s in steps},
            "stopped_at": [(r["stopped"] or {}).get("step") for r in runs.values()],
            "datasets": {n: mean_std([r["best"]["test"]["datasets"][n] for r in runs.values()])[0]
                         for n in next(iter(runs.values()))["best"]["test"]["datasets"]},
            "seconds": mean_std([r["seconds"]["wall"] for r in runs.values()])[0],
            "chance": next(iter(runs.values()))["best"]["test"]["chance"],
        }
    mech = {}
    for seed in st.seeds:
        m = read_json(paths.mech / f"seed{seed}.json")
        if m:
            mech[seed] = m
    rep["mechanism"] = aggregate_mechanism(mech, res, st)
    atomic_json(paths.report_json, rep)
    paths.report_md.write_text(report_markdown(rep, st))
    return rep


def aggregate_mechanism(mech: dict[int, Any], res: dict[str, dict[int, Any]], st: Settings) -> dict[str, Any]:
    """Per model (base / stage 1 / stages 1,2 / stage 2 alone): mean ± std over seeds of each measurement, with
    the zero-shot validation P@1 taken from the stage-3 runs' step 0 (their input model)."""
    if not mech:
        return {}
    zero = {"base": "s3", "stage 1": "s13", "stages 1,2": "s123", "stage 2 alone": "s23"}
    out: dict[str, Any] = {}
    models = list(next(iter(mech.values()))["measures"])
    for name in models:
        row: dict[str, Any] = {}
        keys = sorted({k for m in mech.values() for k in m["measures"].get(name, {}) if isinstance(m["measures"][name][k], (int, float))})
        for k in keys:
            row[k] = mean_std([m["measures"][name].get(k) for m in mech.values()])
        arm = zero.get(name)
        if arm in res:
            row["zero_shot_val"] = mean_std([r.get("step0_val") for r in res[arm].values()])
        out[name] = row
    return out


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch
        import transformers

        info["torch"] = torch.__version__
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def _pm(c: Any, scale: float = 100.0) -> str:
    m, s = (c["mean"], c["std"]) if isinstance(c, dict) else c
    return "–" if m is None or math.isnan(m) else f"{scale * m:.1f} ± {scale * s:.1f}"


def report_markdown(rep: dict[str, Any], st: Settings) -> str:
    L: list[str] = []
    ch = rep["choices"]
    sw = rep["sweeps"]
    if sw["s3_lr"]:
        L += ["#### Sweep 1: the baseline's stage-3 learning rate (seed %d, validation P@1 %% at the best checkpoint)"
              % st.seeds[0], "", "| stage-3 lr | best val P@1 | at step |", "|---|---:|---:|"]
        L += [f"| {lr}{' (chosen)' if ch.get('s3_lr') is not None and fmt_lr(ch['s3_lr']) == lr else ''} | "
              f"{100 * v['val']:.1f} | {v['step']} |" for lr, v in sw["s3_lr"].items()]
        L.append("")
    if sw["config"]:
        L += ["#### Sweep 2: stages 1-2 settings (seed %d; validation P@1 %% of the 1,2,3 run they lead to)"
              % st.seeds[0], "", "| configuration | best val P@1 | at step |", "|---|---:|---:|"]
        L += [f"| {c}: {st.configs[c].get('label', '')}{' (chosen)' if ch.get('config') == c else ''} | "
              f"{100 * v['val']:.1f} | {v['step']} |" for c, v in sw["config"].items()]
        L.append("")
    titles = {"equal_stage3_budget": "(a) Test P@1 (%) at each run's best validation checkpoint (stage 3 to its plateau)",
              "equal_total_compute": "(b) Test P@1 (%) at equal total compute: best validation checkpoint within "
                                     f"{st.s3_max_steps} stage-3-step equivalents, stages 1-2 included"}
    for view, title in titles.items():
        table = rep["comparisons"].get(view, {})
        if not table:
            continue
        diffs = rep["comparisons"].get(view + "_vs_baseline", {})
        L += [f"#### {title}", "",
              "| arm | seeds | stage-3 steps | val | test overall | classification | VQA | retrieval | grounding | IND | OOD | Δ test overall vs baseline (paired) |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for arm in st.arms:
            if arm not in table:
                continue
            row = table[arm]
            d = diffs.get(arm)
            dtxt = f"{100 * d['mean']:+.1f} ± {100 * d['std']:.1f} ({d['wins']}/{d['n']} seeds better)" if d else "–"
            L.append(f"| {ARMS[arm][1]} | {row['n']} | {', '.join(map(str, row['steps']))} | {_pm(row['val'])} | "
                     + " | ".join(_pm(row[c]) for c in COLUMNS) + f" | {dtxt} |")
        L.append("")
    if rep["arms"]:
        steps = sorted({int(s) for a in rep["arms"].values() for s in a["val_curve"]})
        L += ["#### Validation curves: P@1 (%) by stage-3 step (mean ± std over the seeds that reached it)", "",
              "| arm | " + " | ".join(map(str, steps)) + " | stopped at |", "|---|" + "---:|" * (len(steps) + 1)]
        for arm in st.arms:
            if arm in rep["arms"]:
                cur = {int(k): v for k, v in rep["arms"][arm]["val_curve"].items()}
                L.append(f"| {ARMS[arm][1]} | " + " | ".join(_pm(cur[s]) if s in cur else "–" for s in steps)
                         + f" | {', '.join(str(x) for x in rep['arms'][arm]['stopped_at'])} |")
        L.append("")
        names = list(next(iter(rep["arms"].values()))["datasets"])
        L += ["#### Per test dataset at the best validation checkpoint (mean P@1 %)", "",
              "| arm | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for arm in st.arms:
            if arm in rep["arms"]:
                ds = rep["arms"][arm]["datasets"]
                L.append(f"| {ARMS[arm][1]} | " + " | ".join(f"{100 * ds[n]:.1f}" for n in names) + " |")
        L.append("")
    mech = rep.get("mechanism") or {}
    if mech:
        L += ["#### The mechanism, before any contrastive step (mean ± std over seeds)", "",
              "| model | zero-shot val P@1 % | probe: count | probe: colours (F1) | probe: shapes (F1) | "
              "probe: leftmost colour | stage-2 acc, own A | stage-2 acc, A swapped | drop |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, row in mech.items():
            g = lambda k: _pm(row[k]) if k in row else "–"  # noqa: E731
            L.append(f"| {name} | {g('zero_shot_val')} | {g('probe_count')} | {g('probe_colors_f1')} | "
                     f"{g('probe_shapes_f1')} | {g('probe_leftmost_color')} | {g('swap_acc_own')} | "
                     f"{g('swap_acc_swapped')} | {g('swap_acc_drop')} |")
        L.append("")
    return "\n".join(L)


def plot_curves(paths: Paths, st: Settings, png: Path) -> Path | None:
    rep = read_json(paths.report_json) or build_report(paths, st)
    if not rep["arms"] and not rep["sweeps"]["s3_lr"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    colors = {"s3": "black", "s13": "tab:blue", "s23": "tab:orange", "s123": "tab:red"}
    for arm, a in rep["arms"].items():
        cur = {int(k): v for k, v in a["val_curve"].items()}
        xs = sorted(cur)
        m = [100 * cur[x][0] for x in xs]
        s = [100 * cur[x][1] for x in xs]
        axes[0].plot(xs, m, marker="o", ms=3, color=colors.get(arm), label=a["label"], lw=2 if arm in ("s3", "s123") else 1.3)
        axes[0].fill_between(xs, [u - v for u, v in zip(m, s)], [u + v for u, v in zip(m, s)], color=colors.get(arm), alpha=0.12)
    for lr, v in rep["sweeps"]["s3_lr"].items():
        cur = {int(k): x for k, x in v["curve"].items()}
        axes[1].plot(sorted(cur), [100 * cur[k] for k in sorted(cur)], marker="o", ms=3, label=f"baseline, lr {lr}")
    for c, v in rep["sweeps"]["config"].items():
        cur = {int(k): x for k, x in v["curve"].items()}
        axes[2].plot(sorted(cur), [100 * cur[k] for k in sorted(cur)], marker="o", ms=3, label=f"1,2,3 {c}")
    axes[0].set_title("validation P@1 by stage-3 step (chosen settings; mean ± std)")
    axes[1].set_title("sweep 1: baseline stage-3 lr (seed %d)" % st.seeds[0])
    axes[2].set_title("sweep 2: stages 1-2 settings (seed %d)" % st.seeds[0])
    for ax in axes:
        ax.set_xlabel("stage-3 step")
        ax.set_ylabel("validation P@1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------
INT_FIELDS = ("train_pairs", "pretrain_pairs", "val_per_task", "test_per_task", "distractors", "pretrain_steps",
              "s3_max_steps", "s3_batch", "s3_warmup_steps", "eval_every", "patience", "s1_steps", "s2_steps",
              "s12_batch", "eval_batch", "pretrain_seed", "train_seed", "val_seed", "test_seed")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("runs/ablation"), help="where everything is written")
    p.add_argument("--quick", action="store_true", help="toy sizes: every arm, sweep and measurement end to end")
    p.add_argument("--plan", action="store_true", help="print the tasks known so far and their commands, run nothing")
    p.add_argument("--report-only", action="store_true", help="aggregate finished tasks, train nothing")
    p.add_argument("--png", type=Path, default=None, help="also draw the curves here")
    p.add_argument("--jobs", type=int, default=2, help="tasks at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per task")
    p.add_argument("--prep-threads", type=int, default=0, help="threads for data preparation and the base (0: all cores)")
    p.add_argument("--seeds", default=None, help=f"comma-separated (default {','.join(map(str, d.seeds))})")
    p.add_argument("--arms", default=None, help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--s3-lrs", default=None, help=f"stage-3 learning rates to sweep (default {','.join(map(fmt_lr, d.s3_lrs))})")
    p.add_argument("--configs", default=None, help=f"stage 1-2 configurations to sweep, a subset of "
                   f"{','.join(DEFAULT_CONFIGS)} (default: all)")
    for f in INT_FIELDS:
        p.add_argument("--" + f.replace("_", "-"), type=int, default=None, help=f"default {getattr(d, f)}")
    p.add_argument("--train-arg", action="append", default=[], help="extra cocoa-train flag for every run (repeatable)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace, paths: Paths) -> Settings:
    if args.worker or (args.report_only and paths.settings.is_file()):
        return Settings(**json.loads(paths.settings.read_text()))
    over: dict[str, Any] = dict(QUICK) if args.quick else {}
    for f in INT_FIELDS:
        v = getattr(args, f)
        if v is not None:
            over[f] = v
    if args.seeds:
        over["seeds"] = [int(x) for x in args.seeds.split(",") if x.strip()]
    if args.arms:
        over["arms"] = [x.strip() for x in args.arms.split(",") if x.strip()]
    if args.s3_lrs:
        over["s3_lrs"] = [float(x) for x in args.s3_lrs.split(",") if x.strip()]
    if args.configs:
        names = [x.strip() for x in args.configs.split(",") if x.strip()]
        unknown = [n for n in names if n not in DEFAULT_CONFIGS]
        if unknown:
            raise SystemExit(f"--configs: unknown {', '.join(unknown)}; known: {', '.join(DEFAULT_CONFIGS)}")
        over["configs"] = {n: asdict(DEFAULT_CONFIGS[n]) for n in names}
    if args.train_arg:
        over["extra_train_args"] = list(args.train_arg)
    st = Settings(**over)
    st.check()
    if paths.settings.is_file() and not args.plan:
        old = Settings(**json.loads(paths.settings.read_text()))
        changed = sorted(k for k in asdict(st) if k not in ("seeds", "arms") and asdict(st)[k] != asdict(old)[k])
        if changed:
            raise SystemExit(f"{paths.root} holds an experiment with other settings ({', '.join(changed)} differ); "
                             "use another --root, or the same settings to resume it")
    return st


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    paths = Paths(args.root)
    st = settings_from(args, paths)
    if args.worker:
        run_worker(paths, st, args.worker, args.threads)
        return 0
    if args.report_only:
        rep = build_report(paths, st)
        print(paths.report_md.read_text())
        if args.png:
            print(f"curves: {plot_curves(paths, st, args.png)}")
        return 0 if rep["arms"] or rep["sweeps"]["s3_lr"] else 1
    if args.plan:
        schedule(paths, st, args.jobs, args.threads, plan=True)
        return 0
    paths.logs.mkdir(parents=True, exist_ok=True)
    atomic_json(paths.settings, asdict(st))
    t0 = time.time()
    log(f"ablation: root {paths.root}, {args.jobs} task(s) at a time x {args.threads} thread(s); load {load_avg():.2f}")
    prep = prepare(paths, st, args.prep_threads or (os.cpu_count() or 1))
    t_prep = time.time() - t0
    schedule(paths, st, args.jobs, args.threads)
    timings = read_json(paths.root / "timings.json") or []
    timings.append({"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t0)), "prepare": round(t_prep, 1),
                    **{k: round(v, 1) for k, v in prep.items()}, "tasks": round(time.time() - t0 - t_prep, 1),
                    "total": round(time.time() - t0, 1), "load_avg_end": load_avg()})
    atomic_json(paths.root / "timings.json", timings)
    build_report(paths, st)
    print(paths.report_md.read_text())
    if args.png:
        print(f"curves: {plot_curves(paths, st, args.png)}")
    log(f"done in {time.time() - t0:.0f}s: {paths.report_md}, {paths.report_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
