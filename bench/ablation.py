"""The CoCoA-vs-baseline experiment: a miniature of the paper's comparison on the scenes benchmark.

    python bench/ablation.py --root runs/ablation              # the full experiment (~100 min on 2 cores; docs/results.md)
    python bench/ablation.py --root runs/abl-smoke --smoke     # minuscule sizes, end to end (~5 min)
    python bench/ablation.py --root runs/ablation --plan       # print every command, run nothing
    python bench/ablation.py --root runs/ablation --report-only --png docs/ablation_curves.png

What it does (every step through cocoa's own CLI, logged with its exact command line):

1. data: ``cocoa-data scenes`` (one benchmark build: training pairs + IND/OOD eval sets with held-out
   colour x shape compositions), ``cocoa-data synth --source scenes`` (teacher captions + QA),
   ``cocoa-data curate --eval-data`` (decontaminated against that build's eval sets),
   ``cocoa-data mix --ratio 1:1``; plus an "original only" mixture for the synthetic-off arm: the rows
   of ``mix/`` whose origin is the original pairs (same rows, no synthetic ones);
2. the base: ``cocoa-train pretrain-tiny`` -- the tiny Qwen2-VL pre-trained generatively (causal
   attention, next-token captioning and QA on the benchmark's training images), built once and cached;
   every arm starts from it;
3. the arms, each for every seed, from that base, with the same data (``original/`` for stage 3, the
   1:1 mixture for stages 1-2): ``--stages 3`` (the contrastive-only baseline, VLM2Vec-style), ``1,3``,
   ``2,3``, ``1,2,3``, and ``1,2,3`` with the original-only mixture (synthetic data off);
4. stage 3 runs with a constant learning rate after a fixed number of warm-up steps and is
   checkpointed every ``--eval-every`` steps; every checkpoint (and the stage-3 input, step 0) is scored
   with cocoa's evaluator on the benchmark's eval sets. Because the schedule does not depend on the run's
   length, the checkpoint at step t *is* the model a run of t stage-3 steps would give, so one run per
   arm answers both comparisons:

   (a) same stage-3 budget (the paper's comparison): every arm at step ``--s3-steps``;
   (b) same total step budget: arms with stages 1/2 read at ``s3_steps - s1_steps - s2_steps``;

   and the learning curves show whether stage 3 reached its plateau.

Runs execute ``--jobs`` at a time, each training process pinned to ``--threads`` torch threads (on 2
cores: 2 jobs x 1 thread). The experiment is resumable: a run whose ``result.json`` exists is skipped, an
interrupted run continues from its latest checkpoint (``cocoa-train --resume auto``), and evaluations are
cached per checkpoint. ``report.json`` / ``report.md`` hold mean +- std over seeds (overall, per meta-task,
IND/OOD), paired differences to the baseline, and timings; ``--png`` draws the learning curves.

Importable without polars/datasets (they are only imported by the cocoa commands it runs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

META_TASKS = ("classification", "vqa", "retrieval", "grounding")
SPLITS = ("IND", "OOD")
COLUMNS = ("overall", *META_TASKS, *SPLITS)

# arm name -> (stages, label, uses synthetic data in stages 1-2)
ARMS: dict[str, tuple[str, str, bool]] = {
    "s3": ("3", "stage 3 only (baseline)", False),
    "s13": ("1,3", "stages 1,3", True),
    "s23": ("2,3", "stages 2,3", True),
    "s123": ("1,2,3", "stages 1,2,3 (CoCoA)", True),
    "s123-orig": ("1,2,3", "stages 1,2,3, original data only", False),
}


@dataclass
class Settings:
    """Everything that determines the experiment's numbers (saved as ROOT/settings.json)."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    # benchmark build
    scenes_train: int = 4000
    eval_per_task: int = 50
    distractors: int = 99
    scenes_seed: int = 0
    image_size: int = 112
    # generative pre-training of the base
    pretrain_steps: int = 400
    # training budget (steps; batch sizes and learning rates from cocoa-train's tiny preset unless set)
    s1_steps: int = 50
    s2_steps: int = 50
    s3_steps: int = 400
    s3_warmup_steps: int = 10
    s3_batch: int = 32
    s3_lr: float = 3e-4
    s12_batch: int = 16
    eval_every: int = 100
    eval_batch: int = 32
    extra_train_args: list[str] = field(default_factory=list)
    extra_pretrain_args: list[str] = field(default_factory=list)

    def check(self) -> None:
        bad = [a for a in self.arms if a not in ARMS]
        if bad:
            raise SystemExit(f"unknown arm(s) {bad}; known: {', '.join(ARMS)}")
        if self.s3_steps % self.eval_every:
            raise SystemExit(f"--s3-steps {self.s3_steps} must be a multiple of --eval-every {self.eval_every}")
        if self.s1_steps + self.s2_steps >= self.s3_steps:
            raise SystemExit(f"stage 1 + stage 2 steps ({self.s1_steps} + {self.s2_steps}) must stay below "
                             f"--s3-steps {self.s3_steps}, so that comparison (b) reads a stage-3 checkpoint")

    def eval_steps(self, arm: str) -> list[int]:
        """Stage-3 steps scored for ``arm``: the curve (every ``eval_every``) and the step comparison (b) reads."""
        return sorted({*range(0, self.s3_steps + 1, self.eval_every), equal_total_step(self, arm)})

    @property
    def save_every(self) -> int:
        """Checkpoint interval: every step any arm is scored at is a checkpoint."""
        return math.gcd(*[s for a in ARMS for s in self.eval_steps(a) if s])


SMOKE = dict(seeds=[0, 1], scenes_train=240, eval_per_task=6, distractors=15, pretrain_steps=8, s1_steps=2,
             s2_steps=2, s3_steps=8, s3_warmup_steps=1, s3_batch=8, s12_batch=8, eval_every=2, eval_batch=32,
             extra_pretrain_args=["--align-steps", "2", "--align-batch-size", "8"])


# ---------------------------------------------------------------------------------------------------
# paths and small helpers
# ---------------------------------------------------------------------------------------------------
class Paths:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.scenes = root / "scenes"
        self.data = root / "data"  # cocoa workspace: original/, synthetic/, curated/, mix/
        self.orig_mix = root / "data-orig" / "mix"  # MixRecords of original origin only
        self.base = root / "base"
        self.runs = root / "runs"
        self.cache = root / "cache"
        self.logs = root / "logs"
        self.settings = root / "settings.json"
        self.report_json = root / "report.json"
        self.report_md = root / "report.md"
        self.commands = root / "commands.sh"

    def run_dir(self, name: str) -> Path:
        return self.runs / name


def run_name(arm: str, seed: int) -> str:
    return f"{arm}-seed{seed}"


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
        if note:
            f.write(f"# {note}\n")
        f.write(shlex.join(cmd) + "\n")


def sh(paths: Paths, cmd: list[str], log_file: Path, *, threads: int | None = None, note: str = "",
       plan: bool = False) -> float:
    """Run one CLI command (printed first), output to ``log_file``; raise with the log's tail on failure."""
    print(f"$ {shlex.join(cmd)}", flush=True)
    if plan:
        return 0.0
    record_command(paths, cmd, note)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_file, "a") as out:
        out.write(f"\n$ {shlex.join(cmd)}\n")
        out.flush()
        rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=bin_env(threads), stdin=subprocess.DEVNULL)
    dt = time.time() - t0
    if rc != 0:
        tail = log_file.read_text(errors="replace").splitlines()[-25:]
        raise SystemExit(f"command failed (exit {rc}) after {dt:.0f}s: {shlex.join(cmd)}\nlog {log_file}:\n"
                         + "\n".join(tail))
    return dt


def is_complete_dataset(path: Path) -> bool:
    m = path / "manifest.json"
    if not m.is_file():
        return False
    try:
        return bool(json.loads(m.read_text()).get("complete"))
    except (OSError, json.JSONDecodeError):
        return False


def atomic_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# 1-2: data and base model
# ---------------------------------------------------------------------------------------------------
def prepare(paths: Paths, st: Settings, threads: int, plan: bool = False) -> dict[str, float]:
    """Benchmark build, synthesis, curation, mixtures, the generatively pre-trained base; returns timings."""
    t: dict[str, float] = {}
    lg = paths.logs / "prepare.log"
    if (paths.scenes / "benchmark.json").is_file():
        log(f"scenes benchmark: reusing {paths.scenes}")
    else:
        t["scenes"] = sh(paths, ["cocoa-data", "scenes", "--out", str(paths.scenes), "--train", str(st.scenes_train),
                                 "--eval-per-task", str(st.eval_per_task), "--distractors", str(st.distractors),
                                 "--seed", str(st.scenes_seed), "--image-size", str(st.image_size)],
                         lg, threads=threads, note="benchmark build (training pairs + IND/OOD eval sets)", plan=plan)
    # synth resumes by itself: finished requests are skipped
    t["synth"] = sh(paths, ["cocoa-data", "synth", "--source", "scenes", "--scenes-dir", str(paths.scenes),
                            "--out", str(paths.data), "--no-progress"],
                    lg, threads=threads, note="teacher captions + QA for every training image", plan=plan)
    if is_complete_dataset(paths.data / "mix") and not plan:
        log(f"curation + mix: reusing {paths.data / 'mix'}")
    else:
        t["curate"] = sh(paths, ["cocoa-data", "curate", "--data", str(paths.data), "--eval-data",
                                 str(paths.scenes / "eval"), "--no-progress"],
                         lg, threads=threads, note="filter, dedupe, decontaminate against the eval sets", plan=plan)
        t["mix"] = sh(paths, ["cocoa-data", "mix", "--ratio", "1:1", "--data", str(paths.data), "--no-progress"],
                      lg, threads=threads, note="original:synthetic 1:1", plan=plan)
    if not plan:
        t["orig_mix"] = original_only_mix(paths)
    else:
        print(f"# (python) rows of {paths.data / 'mix'} with origin=original -> {paths.orig_mix}")
    if (paths.base / "cocoa.json").is_file():
        log(f"base model: reusing {paths.base}")
    else:
        t["pretrain"] = sh(paths, ["cocoa-train", "pretrain-tiny", "--data", str(paths.scenes), "--steps",
                                   str(st.pretrain_steps), "--out", str(paths.base), "--no-progress",
                                   *st.extra_pretrain_args],
                           lg, threads=threads, note="generative pre-training of the tiny MLLM (cached)", plan=plan)
    diag = paths.root / "base_image_dependence.json"
    if not plan and not diag.is_file():
        try:
            d = image_dependence(paths.base)
        except Exception as e:  # a diagnostic: report it missing rather than stop the experiment
            d = {"error": f"{type(e).__name__}: {e}"}
        atomic_json(diag, d)
        log(f"base image dependence (held-out loss, true vs shuffled images): {d}")
    return t


def original_only_mix(paths: Paths) -> float:
    """The synthetic-off mixture: exactly the original-origin rows of the 1:1 mixture."""
    if is_complete_dataset(paths.orig_mix):
        return 0.0
    t0 = time.time()
    from cocoa.shards import open_dataset, write_records

    src = open_dataset(paths.data / "mix", record_type="MixRecord")
    rows = [r for r in src if r.origin == "original"]
    if not rows:
        raise SystemExit(f"{paths.data / 'mix'} has no original rows; rebuild it with cocoa-data mix")
    write_records(paths.orig_mix, "MixRecord", rows, overwrite=True,
                  provenance={"stage": "ablation-original-only", "from": str(paths.data / "mix"), "rows": len(rows)})
    log(f"original-only mixture: {len(rows)} of {len(src)} rows -> {paths.orig_mix}")
    return time.time() - t0


def image_dependence(base: Path, n_pairs: int = 200, seed: int = 7) -> dict[str, Any]:
    """Does the generatively pre-trained base read its images? Its held-out response loss with the right
    images vs. with images shuffled across examples (the diagnostic of docs/models.md): no gap means a
    language prior only. Uses fresh scenes (``seed``), never the benchmark's."""
    import random
    from dataclasses import replace

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from cocoa.sources import scenes
    from cocoa.tiny import pretrain as P

    model = AutoModelForImageTextToText.from_pretrained(str(base)).eval()
    proc = AutoProcessor.from_pretrained(str(base))
    batcher = P._Batcher(proc, "<|endoftext|>", 256, None)
    out: dict[str, Any] = {"pairs": n_pairs, "seed": seed}
    recs = list(scenes.iter_train_pairs(n_pairs, seed=seed))
    for kind in ("caption", "pair"):
        exs = [e for r in recs for e in P.examples_from_record(r) if e.kind == kind][:64]
        imgs = [e.image for e in exs]
        random.Random(0).shuffle(imgs)
        for name, ex in (("true", exs), ("shuffled", [replace(e, image=i) for e, i in zip(exs, imgs)])):
            with torch.no_grad():
                losses = [P.response_loss(model, batcher(ex[i:i + 16])).item() for i in range(0, len(ex), 16)]
            out[f"{kind}_{name}"] = round(sum(losses) / len(losses), 4)
        out[f"{kind}_gap"] = round(out[f"{kind}_shuffled"] - out[f"{kind}_true"], 4)
    return out


# ---------------------------------------------------------------------------------------------------
# 3-4: one run = train (CLI) + evaluate its stage-3 checkpoints (in this process)
# ---------------------------------------------------------------------------------------------------
def train_command(paths: Paths, st: Settings, arm: str, seed: int) -> list[str]:
    stages, _, synthetic = ARMS[arm]
    out = paths.run_dir(run_name(arm, seed))
    warm = st.s3_warmup_steps / st.s3_steps
    cmd = ["cocoa-train", "--stages", stages, "--data", str(paths.data), "--model", str(paths.base),
           "--preset", "tiny", "--out", str(out), "--seed", str(seed), "--no-progress", "--log-every", "5",
           "--keep-checkpoints", "1000",
           "--stage3-steps", str(st.s3_steps), "--stage3-batch-size", str(st.s3_batch),
           "--stage3-micro-batch-size", str(st.s3_batch), "--no-stage3-grad-cache",
           "--stage3-lr", f"{st.s3_lr:g}", "--stage3-schedule", "constant",
           "--stage3-warmup-ratio", f"{warm:.6g}", "--stage3-save-every", str(st.save_every)]
    if "1" in stages:
        cmd += ["--stage1-steps", str(st.s1_steps), "--stage1-batch-size", str(st.s12_batch),
                "--stage1-micro-batch-size", str(st.s12_batch)]
    if "2" in stages:
        cmd += ["--stage2-steps", str(st.s2_steps), "--stage2-batch-size", str(st.s12_batch),
                "--stage2-micro-batch-size", str(st.s12_batch)]
    if not synthetic and stages != "3":
        for k in ("1", "2"):
            if k in stages:
                cmd += [f"--stage{k}-data", str(paths.orig_mix.resolve())]
    return cmd + list(st.extra_train_args)


_EVAL_SETS: dict[str, Any] = {}


def eval_model(model_dir: Path, paths: Paths, st: Settings, out: Path) -> dict[str, Any]:
    """Score a model directory on the benchmark (cached in ``out/results.json``)."""
    res = out / "results.json"
    if res.is_file():
        return json.loads(res.read_text())
    from cocoa.eval import evaluate
    from cocoa.eval.evaluator import load_sets

    if "sets" not in _EVAL_SETS:  # read the eval sets (and their images) once per process
        _EVAL_SETS["sets"] = load_sets("scenes", data=str(paths.scenes))
    r = evaluate(str(model_dir), "scenes", out=str(out), cache=False, sets=_EVAL_SETS["sets"],
                 batch_size=st.eval_batch, device="cpu", dtype="float32", plot=False, quiet=True)
    return r.model_dump(mode="json")


def materialize(ckpt: Path, like_model: Path, dest: Path) -> Path:
    """A model directory (HF weights + processor + cocoa.json of ``like_model``) with a checkpoint's weights.

    Stage 3 trains every weight here (``--preset tiny``: full fine-tuning), so ``weights.safetensors`` holds
    the whole model under ``CocoaModel`` names (``model.`` + the HF module names)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    if (dest / "model.safetensors").is_file():
        return dest
    weights = load_file(str(ckpt / "weights.safetensors"))
    sd = {k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")}
    if len(sd) != len(weights):
        raise SystemExit(f"{ckpt}: unexpected parameter names (not a full fine-tuning checkpoint of CocoaModel)")
    hf = AutoModelForImageTextToText.from_pretrained(str(like_model), dtype=torch.float32)
    got = hf.load_state_dict(sd, strict=False)
    tied = {"lm_head.weight"} if getattr(hf.config, "tie_word_embeddings", False) or getattr(
        getattr(hf.config, "text_config", None), "tie_word_embeddings", False) else set()
    if got.unexpected_keys or set(got.missing_keys) - tied:
        raise SystemExit(f"{ckpt} does not fit {like_model}: missing {got.missing_keys[:3]}, "
                         f"unexpected {got.unexpected_keys[:3]}")
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(str(tmp))
    for f in like_model.iterdir():  # processor, tokenizer, cocoa.json: as the finished stage-3 model has them
        if f.is_file() and not f.name.startswith("model") and f.name not in ("config.json", "generation_config.json"):
            shutil.copy2(f, tmp / f.name)
    os.replace(tmp, dest)
    return dest


def stage3_input(paths: Paths, run: Path, stages: str) -> Path:
    prev = [k for k in stages.split(",") if k != "3"]
    return run / f"stage{prev[-1]}" / "model" if prev else paths.base


def worker(paths: Paths, st: Settings, arm: str, seed: int, threads: int) -> dict[str, Any]:
    """Train one run through the CLI, then score its stage-3 input and checkpoints; write result.json."""
    name = run_name(arm, seed)
    run = paths.run_dir(name)
    result_file = run / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    import torch

    torch.set_num_threads(threads)
    stages = ARMS[arm][0]
    cmd = train_command(paths, st, arm, seed)
    t0 = time.time()
    sh(paths, cmd, paths.logs / f"{name}.log", threads=threads, note=f"run {name}")
    t_train = time.time() - t0
    final = run / "stage3" / "model"
    ckpts = {int(p.name.split("-")[1]): p for p in (run / "stage3" / "checkpoints").glob("step-*")
             if (p / "state.json").is_file()}
    curve: dict[int, dict[str, Any]] = {}
    t1 = time.time()
    for step in st.eval_steps(arm):
        out = run / "evals" / f"step-{step:06d}"
        if step == 0:
            model = stage3_input(paths, run, stages)
        elif step == st.s3_steps:
            model = final
        else:
            if (out / "results.json").is_file():
                model = None
            elif step not in ckpts:
                raise SystemExit(f"{name}: no stage-3 checkpoint at step {step} in {run / 'stage3' / 'checkpoints'}")
            else:
                model = materialize(ckpts[step], final, run / "evals" / f"model-{step:06d}")
        r = eval_model(model, paths, st, out) if model is not None else json.loads((out / "results.json").read_text())
        curve[step] = flat(r)
        if model is not None and model.name.startswith("model-"):
            shutil.rmtree(model, ignore_errors=True)  # keep the scores, not the intermediate weights
        log(f"{name}: stage-3 step {step:>4}: P@1 overall {curve[step]['overall']:.3f}")
    t_eval = time.time() - t1
    seconds = {}
    for k in stages.split(","):
        s = run / f"stage{k}" / "summary.json"
        if s.is_file():
            seconds[f"stage{k}"] = json.loads(s.read_text()).get("seconds")
    result = {"arm": arm, "seed": seed, "stages": stages, "command": shlex.join(cmd), "curve": curve,
              "final": curve[st.s3_steps], "seconds": {"train": round(t_train, 1), "eval": round(t_eval, 1),
                                                      **seconds}, "settings": asdict(st)}
    atomic_json(result_file, result)
    for k in stages.split(","):  # checkpoints were only needed for the curve (and resuming)
        shutil.rmtree(run / f"stage{k}" / "checkpoints", ignore_errors=True)
    return result


def flat(r: dict[str, Any]) -> dict[str, Any]:
    out = {"overall": r.get("overall")}
    out.update({m: (r.get("meta_tasks") or {}).get(m) for m in META_TASKS})
    out.update({s: (r.get("splits") or {}).get(s) for s in SPLITS})
    out["datasets"] = {n: d["p_at_1"] for n, d in (r.get("datasets") or {}).items()}
    return out


# ---------------------------------------------------------------------------------------------------
# scheduling
# ---------------------------------------------------------------------------------------------------
PRIORITY = ["s123", "s3", "s123-orig", "s13", "s23"]


class _External:
    """A worker started by an earlier scheduler: alive while its /proc entry is."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def poll(self) -> int | None:
        return None if Path(f"/proc/{self.pid}").exists() else 0


def live_workers(paths: Paths) -> dict[str, int]:
    """Running ``--worker`` processes of this experiment (same ``--root``), by run name (Linux /proc)."""
    out: dict[str, int] = {}
    root = paths.root.resolve()
    for d in Path("/proc").glob("[0-9]*"):
        try:
            args = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
            cwd = Path(os.readlink(d / "cwd"))
        except OSError:
            continue
        if int(d.name) == os.getpid() or not any(a.endswith("ablation.py") for a in args) or "--worker" not in args:
            continue
        try:
            r = Path(args[args.index("--root") + 1])
        except (ValueError, IndexError):
            continue
        if (cwd / r).resolve() == root:
            out[args[args.index("--worker") + 1]] = int(d.name)
    return out


def schedule(paths: Paths, st: Settings, jobs: int, threads: int, plan: bool = False,
             skip: tuple[str, ...] = ()) -> None:
    # seed by seed (a shrunk experiment keeps whole seeds); within a seed the key pair (CoCoA, baseline) first
    todo = [(a, s) for s in st.seeds for a in sorted(st.arms, key=PRIORITY.index)]
    unknown = sorted(set(skip) - {run_name(a, s) for a, s in todo})
    if unknown:
        raise SystemExit(f"--skip names no run of this experiment: {', '.join(unknown)} (runs are ARM-seedN)")
    pending = [(a, s) for a, s in todo if not (paths.run_dir(run_name(a, s)) / "result.json").is_file()]
    done = len(todo) - len(pending)
    if done:
        log(f"{done} of {len(todo)} runs already finished (result.json), skipping them")
    if skip:
        pending = [(a, s) for a, s in pending if run_name(a, s) not in skip]
        log(f"not starting {', '.join(skip)} (--skip); the report counts the seeds that finished")
    if plan:
        for a, s in pending:
            print(f"$ {shlex.join(train_command(paths, st, a, s))}")
        return
    running: dict[str, tuple[Any, float, Any]] = {}
    failed: list[str] = []
    # workers of an earlier scheduler that are still running (this one was restarted): wait for them
    for name, pid in live_workers(paths).items():
        running[name] = (_External(pid), time.time(), None)
        pending = [(a, s) for a, s in pending if run_name(a, s) != name]
        log(f"adopted {name}: its worker (pid {pid}) is still running")
    me = [sys.executable, str(Path(__file__).resolve()), "--root", str(paths.root), "--threads", str(threads)]
    while pending or running:
        while pending and len(running) < jobs:
            a, s = pending.pop(0)
            name = run_name(a, s)
            lf = open(paths.logs / f"{name}.worker.log", "a")
            p = subprocess.Popen(me + ["--worker", name], stdout=lf, stderr=subprocess.STDOUT, env=bin_env(threads),
                                 stdin=subprocess.DEVNULL)
            running[name] = (p, time.time(), lf)
            log(f"started {name} (pid {p.pid}); {len(pending)} waiting")
        time.sleep(2)
        for name, (p, t0, lf) in list(running.items()):
            rc = p.poll()
            if rc is None:
                continue
            if lf is not None:
                lf.close()
            del running[name]
            if rc == 0 and (paths.run_dir(name) / "result.json").is_file():
                r = json.loads((paths.run_dir(name) / "result.json").read_text())
                log(f"finished {name} in {time.time() - t0:.0f}s: P@1 {r['final']['overall']:.3f}")
            else:
                failed.append(name)
                log(f"FAILED {name} (exit {rc}); see {paths.logs / (name + '.worker.log')}")
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: {', '.join(failed)}; rerun the same command to retry them")


# ---------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------
def mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def load_results(paths: Paths, st: Settings) -> dict[str, dict[int, dict[str, Any]]]:
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for a in st.arms:
        for s in st.seeds:
            f = paths.run_dir(run_name(a, s)) / "result.json"
            if f.is_file():
                r = json.loads(f.read_text())
                r["curve"] = {int(k): v for k, v in r["curve"].items()}
                out.setdefault(a, {})[s] = r
    return out


def equal_total_step(st: "Settings", arm: str) -> int:
    stages = ARMS[arm][0]
    return st.s3_steps - (st.s1_steps if "1" in stages else 0) - (st.s2_steps if "2" in stages else 0)


def build_report(paths: Paths, st: Settings, prep_seconds: dict[str, float] | None = None) -> dict[str, Any]:
    res = load_results(paths, st)
    rep: dict[str, Any] = {"settings": asdict(st), "arms": {}, "comparisons": {}, "machine": machine(),
                           "chance_overall": chance_level(paths),
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    diag = paths.root / "base_image_dependence.json"
    if diag.is_file():
        rep["base_image_dependence"] = json.loads(diag.read_text())
    if (paths.base / "cocoa.json").is_file():
        ex = json.loads((paths.base / "cocoa.json").read_text()).get("extra", {})
        rep["base"] = {k: ex.get(k) for k in ("steps", "lr", "batch_size", "examples", "loss_first", "loss_last",
                                              "seconds", "num_parameters", "curriculum", "image_gap", "align_steps",
                                              "vision_align", "pretrain_version")}
    if prep_seconds:
        rep["prepare_seconds"] = {k: round(v, 1) for k, v in prep_seconds.items()}
    for view, step_of in (("same_stage3_budget", lambda a: st.s3_steps), ("same_total_budget", lambda a: equal_total_step(st, a))):
        table = {}
        for a, runs in res.items():
            step = step_of(a)
            cols = {c: mean_std([r["curve"][step][c] for r in runs.values() if step in r["curve"]]) for c in COLUMNS}
            table[a] = {"step3": step, "n": len(runs), **{c: {"mean": m, "std": s} for c, (m, s) in cols.items()}}
        rep["comparisons"][view] = table
        # paired differences to the baseline (same seed -> same stage-3 data order)
        base = res.get("s3", {})
        diffs = {}
        for a, runs in res.items():
            if a == "s3":
                continue
            d = [runs[s]["curve"][step_of(a)]["overall"] - base[s]["curve"][st.s3_steps]["overall"]
                 for s in runs if s in base]
            m, sd = mean_std(d)
            diffs[a] = {"mean": m, "std": sd, "n": len(d), "wins": sum(x > 0 for x in d)}
        rep["comparisons"][view + "_vs_baseline"] = diffs
    for a, runs in res.items():
        steps = sorted(set.intersection(*[set(r["curve"]) for r in runs.values()]))
        rep["arms"][a] = {
            "stages": ARMS[a][0], "label": ARMS[a][1], "seeds": sorted(runs),
            "curve": {s: dict(zip(("mean", "std"), mean_std([r["curve"][s]["overall"] for r in runs.values()])))
                      for s in steps},
            "datasets": {n: mean_std([r["final"]["datasets"][n] for r in runs.values()])[0]
                         for n in next(iter(runs.values()))["final"]["datasets"]},
            "seconds": {k: mean_std([r["seconds"].get(k) or 0.0 for r in runs.values()])[0]
                        for k in next(iter(runs.values()))["seconds"]},
            "commands": [runs[s]["command"] for s in sorted(runs)],
        }
    atomic_json(paths.report_json, rep)
    paths.report_md.write_text(report_markdown(rep, st))
    return rep


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": os.cpu_count()}
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


def _pm(c: dict[str, float]) -> str:
    return f"{100 * c['mean']:.1f} ± {100 * c['std']:.1f}" if not math.isnan(c["mean"]) else "–"


def report_markdown(rep: dict[str, Any], st: Settings) -> str:
    lines: list[str] = []
    heads = {"same_stage3_budget": f"(a) same stage-3 budget: every arm after {st.s3_steps} stage-3 steps",
             "same_total_budget": "(b) same total step budget: stage 1-2 steps taken out of stage 3's "
                                  f"({st.s3_steps} steps in all)"}
    for view, title in heads.items():
        table = rep["comparisons"].get(view, {})
        if not table:
            continue
        lines += [f"#### {title}", "",
                  "| arm | stage-3 steps | seeds | overall | classification | VQA | retrieval | grounding | IND | OOD | Δ overall vs baseline (paired) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        diffs = rep["comparisons"].get(view + "_vs_baseline", {})
        for a in st.arms:
            if a not in table:
                continue
            row = table[a]
            d = diffs.get(a)
            dtxt = (f"{100 * d['mean']:+.1f} ± {100 * d['std']:.1f} ({d['wins']}/{d['n']} seeds better)" if d else "–")
            lines.append(f"| {ARMS[a][1]} | {row['step3']} | {row['n']} | " + " | ".join(_pm(row[c]) for c in COLUMNS)
                         + f" | {dtxt} |")
        lines.append("")
    if rep["arms"]:
        steps = sorted({int(s) for a in rep["arms"].values() for s in a["curve"] if int(s) % st.eval_every == 0})
        lines += ["#### Learning curves: overall P@1 (%) by stage-3 step (mean ± std over seeds)", "",
                  "| arm | " + " | ".join(str(s) for s in steps) + " |", "|---|" + "---:|" * len(steps)]
        for a in st.arms:
            if a in rep["arms"]:
                cur = {int(k): v for k, v in rep["arms"][a]["curve"].items()}
                lines.append(f"| {ARMS[a][1]} | " + " | ".join(
                    f"{100 * cur[s]['mean']:.1f} ± {100 * cur[s]['std']:.1f}" if s in cur else "–" for s in steps) + " |")
        lines.append("")
        names = list(next(iter(rep["arms"].values()))["datasets"])
        lines += ["#### Per dataset at the same stage-3 budget (mean P@1 %, over seeds)", "",
                  "| arm | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for a in st.arms:
            if a in rep["arms"]:
                ds = rep["arms"][a]["datasets"]
                lines.append(f"| {ARMS[a][1]} | " + " | ".join(f"{100 * ds[n]:.1f}" for n in names) + " |")
        lines += ["", "#### Wall time per run (mean seconds, training processes at 1 thread, 2 at a time)", "",
                  "| arm | train (all stages) | stage 1 | stage 2 | stage 3 | evaluation of the curve |",
                  "|---|---:|---:|---:|---:|---:|"]
        for a in st.arms:
            if a in rep["arms"]:
                s = rep["arms"][a]["seconds"]
                lines.append(f"| {ARMS[a][1]} | {s.get('train', 0):.0f} | {s.get('stage1', 0):.0f} | "
                             f"{s.get('stage2', 0):.0f} | {s.get('stage3', 0):.0f} | {s.get('eval', 0):.0f} |")
        lines.append("")
    return "\n".join(lines)


def chance_level(paths: Paths) -> float | None:
    """Overall P@1 of a random ranking: the mean over datasets of 1 / (mean candidates per query)."""
    for f in sorted(paths.runs.glob("*/evals/step-000000/results.json")):
        ds = json.loads(f.read_text()).get("datasets") or {}
        vals = [1.0 / d["n_candidates"] for d in ds.values() if d.get("n_candidates")]
        if vals:
            return sum(vals) / len(vals)
    return None


def plot_curves(paths: Paths, st: Settings, png: Path) -> Path | None:
    rep = json.loads(paths.report_json.read_text()) if paths.report_json.is_file() else build_report(paths, st)
    if not rep["arms"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = load_results(paths, st)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    colors = {"s3": "black", "s13": "tab:blue", "s23": "tab:orange", "s123": "tab:red", "s123-orig": "tab:purple"}
    for a in st.arms:
        if a not in rep["arms"]:
            continue
        cur = {int(k): v for k, v in rep["arms"][a]["curve"].items()}
        xs = sorted(cur)
        m = [100 * cur[x]["mean"] for x in xs]
        s = [100 * cur[x]["std"] for x in xs]
        kw = dict(color=colors.get(a), label=ARMS[a][1], lw=2 if a in ("s3", "s123") else 1.3,
                  ls="--" if a == "s123-orig" else "-")
        offset = st.s3_steps - equal_total_step(st, a)
        for ax, shift in ((axes[0], 0), (axes[1], offset)):
            ax.plot([x + shift for x in xs], m, marker="o", ms=3, **kw)
            ax.fill_between([x + shift for x in xs], [a_ - b for a_, b in zip(m, s)], [a_ + b for a_, b in zip(m, s)],
                            color=colors.get(a), alpha=0.12)
        for split, ls in (("IND", "-"), ("OOD", ":")) if a in ("s3", "s123") else ():
            vals = [mean_std([r["curve"][x][split] for r in res[a].values() if x in r["curve"]])[0] for x in xs]
            axes[2].plot(xs, [100 * v for v in vals], color=colors.get(a), ls=ls, lw=1.3,
                         label=f"{ARMS[a][1]} {split}")
    chance = chance_level(paths)
    if chance is not None:
        for ax in axes:
            ax.axhline(100 * chance, color="gray", lw=1, ls="--")
        axes[0].text(1, 100 * chance, " chance", va="bottom", fontsize=8, color="gray")
    axes[0].set_title("(a) overall P@1 vs stage-3 steps (mean ± std over seeds)")
    axes[0].set_xlabel("stage-3 step")
    axes[1].set_title("(b) overall P@1 vs total steps (stages 1+2+3)")
    axes[1].set_xlabel("total training steps")
    axes[1].axvline(st.s3_steps, color="gray", lw=0.8, ls=":")
    axes[2].set_title("baseline vs CoCoA: IND (solid) and OOD (dotted) P@1")
    axes[2].set_xlabel("stage-3 step")
    for ax in axes:
        ax.set_ylabel("P@1 (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    axes[2].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("runs/ablation"), help="where everything is written")
    p.add_argument("--smoke", action="store_true", help="minuscule sizes: checks the whole experiment end to end")
    p.add_argument("--plan", action="store_true", help="print the commands, run nothing")
    p.add_argument("--report-only", action="store_true", help="aggregate finished runs, train nothing")
    p.add_argument("--png", type=Path, default=None, help="also draw the learning curves here")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--prep-threads", type=int, default=0, help="threads for data prep/pre-training (0: all cores)")
    p.add_argument("--seeds", default=None, help=f"comma-separated (default {','.join(map(str, d.seeds))})")
    p.add_argument("--arms", default=None, help=f"comma-separated subset of {','.join(ARMS)}")
    for f in ("scenes_train", "eval_per_task", "distractors", "pretrain_steps", "s1_steps", "s2_steps", "s3_steps",
              "s3_warmup_steps", "s3_batch", "s12_batch", "eval_every", "eval_batch"):
        p.add_argument("--" + f.replace("_", "-"), type=int, default=None, help=f"default {getattr(d, f)}")
    p.add_argument("--s3-lr", type=float, default=None, help=f"default {d.s3_lr:g}")
    p.add_argument("--train-arg", action="append", default=[], help="extra cocoa-train flag (repeatable), e.g. "
                   "--train-arg=--stage2-lr=3e-5")
    p.add_argument("--pretrain-arg", action="append", default=[], help="extra cocoa-train pretrain-tiny flag "
                   "(repeatable), e.g. --pretrain-arg=--lr=3e-4")
    p.add_argument("--skip", default="", help="comma-separated runs not to start this time (e.g. s123-orig-seed2), "
                   "to fit a time box; the settings and the other runs are unchanged")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace, paths: Paths) -> Settings:
    if args.worker or (args.report_only and paths.settings.is_file()):
        return Settings(**json.loads(paths.settings.read_text()))
    over: dict[str, Any] = dict(SMOKE) if args.smoke else {}
    for f in ("scenes_train", "eval_per_task", "distractors", "pretrain_steps", "s1_steps", "s2_steps", "s3_steps",
              "s3_warmup_steps", "s3_batch", "s12_batch", "eval_every", "eval_batch", "s3_lr"):
        v = getattr(args, f)
        if v is not None:
            over[f] = v
    if args.seeds:
        over["seeds"] = [int(x) for x in args.seeds.split(",") if x.strip()]
    if args.arms:
        over["arms"] = [x.strip() for x in args.arms.split(",") if x.strip()]
    if args.train_arg:
        over["extra_train_args"] = list(args.train_arg)
    if args.pretrain_arg:
        over["extra_pretrain_args"] = list(args.pretrain_arg)
    st = Settings(**over)
    st.check()
    if paths.settings.is_file() and not args.plan:
        old = Settings(**json.loads(paths.settings.read_text()))
        free = ("seeds", "arms")  # runs are per (arm, seed): adding or dropping some changes no other run
        changed = sorted(k for k in asdict(st) if k not in free and asdict(st)[k] != asdict(old)[k])
        if changed:
            raise SystemExit(f"{paths.root} holds an experiment with other settings ({', '.join(changed)} differ); "
                             "use another --root, or the same settings to resume it")
    return st


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    paths = Paths(args.root)
    st = settings_from(args, paths)
    if args.worker:
        arm, seed = args.worker.rsplit("-seed", 1)
        worker(paths, st, arm, int(seed), args.threads)
        return 0
    if args.report_only:
        rep = build_report(paths, st)
        print(paths.report_md.read_text())
        if args.png:
            print(f"curves: {plot_curves(paths, st, args.png)}")
        return 0 if rep["arms"] else 1
    if not args.plan:
        paths.root.mkdir(parents=True, exist_ok=True)
        paths.logs.mkdir(parents=True, exist_ok=True)
        atomic_json(paths.settings, asdict(st))
    t0 = time.time()
    n = len(st.arms) * len(st.seeds)
    log(f"ablation: {len(st.arms)} arms x {len(st.seeds)} seeds = {n} runs, {args.jobs} at a time x "
        f"{args.threads} thread(s); root {paths.root}")
    prep = prepare(paths, st, args.prep_threads or (os.cpu_count() or 1), plan=args.plan)
    t_prep = time.time() - t0
    schedule(paths, st, args.jobs, args.threads, plan=args.plan,
             skip=tuple(x.strip() for x in args.skip.split(",") if x.strip()))
    if args.plan:
        return 0
    prep["runs"] = time.time() - t0 - t_prep
    prep["total"] = time.time() - t0
    prev = paths.root / "timings.json"
    timings = json.loads(prev.read_text()) if prev.is_file() else []
    timings.append({"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t0)), **prep})
    atomic_json(prev, timings)
    build_report(paths, st, prep)
    print(paths.report_md.read_text())
    if args.png:
        print(f"curves: {plot_curves(paths, st, args.png)}")
    log(f"done in {time.time() - t0:.0f}s: {paths.report_md}, {paths.report_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
