"""`make demo`: the whole cocoa pipeline on the embedded default, on a CPU, through the real commands.

    python -m cocoa.demo            # ~5-6 minutes on 2 CPU cores the first time; seconds to re-run
    python -m cocoa.demo --fast     # a smoke run with minuscule sizes (about a minute)
    COCOA_DEMO_FAST=1 make demo     # the same through make

Steps (each one a `cocoa-*` command run in a subprocess and printed before it runs):

1. ``cocoa-data scenes``      build the procedural scenes benchmark: training pairs + IND/OOD eval sets
                              (held-out colour x shape compositions, unseen phrasings);
2. ``cocoa-data synth``       the programmatic teacher writes detailed captions and QA for every
                              training image (resumable: a re-run skips finished requests);
3. ``cocoa-data curate``      filter, dedupe, decontaminate against the benchmark's eval sets;
4. ``cocoa-data mix``         original:synthetic 1:1 for stages 1-2;
5. ``cocoa-train pretrain-tiny``  the tiny Qwen2-VL pre-trained generatively (causal next-token
                              captioning / QA) on the training images -- cached, built once;
6. ``cocoa-eval`` of that base (the "before" column; full demo only);
7. ``cocoa-train --stages 1,2,3``  CoCoA's three stages from that base;
8. ``cocoa-eval --benchmark scenes``  P@1 table (per dataset, meta-task, IND/OOD) + report files.

Everything lands under ``demo/`` (``demo/fast/`` with ``--fast``). A re-run reuses what is done: an
existing benchmark, the synthesised records, the curated mixture, the cached base model, finished
training stages and cached embeddings; it says so for each step.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .tiny.pretrain import PRETRAIN_VERSION


@dataclass(frozen=True)
class Sizes:
    train: int  # scenes training pairs
    eval_per_task: int
    distractors: int
    pretrain_steps: int
    pretrain_batch: int
    align_steps: int  # contrastive alignment of the vision tower before generative pre-training
    align_batch: int
    s1_steps: int
    s2_steps: int
    s3_steps: int
    s12_batch: int
    s3_batch: int
    compare_base: bool


FULL = Sizes(train=2000, eval_per_task=30, distractors=99, pretrain_steps=300, pretrain_batch=16, align_steps=200,
             align_batch=32, s1_steps=200, s2_steps=200,
             s3_steps=100, s12_batch=16, s3_batch=32, compare_base=True)
FAST = Sizes(train=160, eval_per_task=4, distractors=15, pretrain_steps=4, pretrain_batch=8, align_steps=2,
             align_batch=8, s1_steps=2, s2_steps=2, s3_steps=4,
             s12_batch=8, s3_batch=8, compare_base=False)


def _flags(settings: dict[str, Any], prefix: str = "") -> list[str]:
    """``{"stage1": {"batch_size": 16}}`` -> ``["--stage1-batch-size", "16"]``: cocoa's flag for each setting."""
    out: list[str] = []
    for key, v in settings.items():
        name = f"{prefix}{key.replace('_', '-')}"
        out += _flags(v, name + "-") if isinstance(v, dict) else [f"--{name}", str(v)]
    return out


class DemoError(RuntimeError):
    pass


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # the cocoa-* entry points of this interpreter's environment come first
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _complete(dataset_dir: Path) -> bool:
    m = dataset_dir / "manifest.json"
    try:
        return m.is_file() and bool(json.loads(m.read_text()).get("complete"))
    except (OSError, json.JSONDecodeError):
        return False


def _shard_digests(*dataset_dirs: Path) -> list[list[str]]:
    """The sha256 of every shard of each dataset (from its manifest): what a later step was built from."""
    out = []
    for d in dataset_dirs:
        try:
            m = json.loads((d / "manifest.json").read_text())
            out.append(sorted(s["sha256"] for s in m.get("shards", [])))
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            out.append([])
    return out


class Demo:
    def __init__(self, root: Path, sizes: Sizes, quiet: bool = False) -> None:
        self.root = root
        self.sizes = sizes
        self.quiet = quiet
        self.scenes = root / "scenes"
        self.shards = root / "shards"
        self.base = root / "base"
        self.run = root / "runs" / "cocoa"
        self.eval = root / "eval"
        self.eval_base = root / "eval-base"
        self.timings: list[tuple[str, float, str]] = []
        self.n = 0
        self.total = 8 if sizes.compare_base else 7

    # -- output --------------------------------------------------------------------------------------
    def say(self, msg: str = "") -> None:
        print(msg, flush=True)

    def step(self, title: str) -> None:
        self.n += 1
        self.say(f"\n=== [{self.n}/{self.total}] {title}")

    def cmd(self, args: list[str], what: str) -> float:
        self.say(f"$ {shlex.join(args)}")
        t0 = time.time()
        out = subprocess.DEVNULL if self.quiet else None
        rc = subprocess.call(args, env=_env(), stdout=out, stderr=None if not self.quiet else subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
        dt = time.time() - t0
        if rc != 0:
            raise DemoError(f"`{shlex.join(args)}` failed with exit code {rc} (see its output above); fix it and "
                            "re-run `make demo` -- finished steps are reused")
        self.timings.append((what, dt, "ran"))
        return dt

    def reuse(self, what: str, why: str) -> None:
        self.say(f"reusing {why}")
        self.timings.append((what, 0.0, "reused"))

    # -- the pipeline ---------------------------------------------------------------------------------
    def main(self) -> int:
        s = self.sizes
        t0 = time.time()
        self.say(f"cocoa demo: the whole pipeline on the embedded default, on {os.cpu_count()} CPU core(s), under "
                 f"{self.root}/")

        self.step("scenes benchmark: training pairs + IND/OOD evaluation sets")
        if (self.scenes / "benchmark.json").is_file():
            self.reuse("scenes", f"the benchmark in {self.scenes} (delete it to rebuild)")
        else:
            self.cmd(["cocoa-data", "scenes", "--out", str(self.scenes), "--train", str(s.train), "--eval-per-task",
                      str(s.eval_per_task), "--distractors", str(s.distractors), "--seed", "0"], "scenes")

        self.step("teacher synthesis: detailed captions + QA for every training image (resumable)")
        done_before = _complete(self.shards / "synthetic")
        if done_before:
            self.say("(synthetic/ is complete: the teacher skips every finished request)")
        self.cmd(["cocoa-data", "synth", "--source", "scenes", "--scenes-dir", str(self.scenes), "--out",
                  str(self.shards), "--no-progress"], "synth")

        self.step("curation (decontaminated against the benchmark's eval sets) and the 1:1 mixture")
        stamp = self.root / ".mix-inputs.json"  # the synthetic + original shards the mixture was made from
        inputs = _shard_digests(self.shards / "synthetic", self.shards / "original")
        if _complete(self.shards / "mix") and stamp.is_file() and json.loads(stamp.read_text()) == inputs:
            self.reuse("curate + mix", f"{self.shards / 'curated'} and {self.shards / 'mix'} (same synthetic/original)")
        else:
            self.cmd(["cocoa-data", "curate", "--data", str(self.shards), "--eval-data", str(self.scenes / "eval"),
                      "--no-progress"], "curate")
            self.cmd(["cocoa-data", "mix", "--ratio", "1:1", "--data", str(self.shards), "--no-progress"], "mix")
            stamp.write_text(json.dumps(inputs))

        self.step("tiny MLLM, generatively pre-trained (causal next-token captioning + QA; cached)")
        want = {"steps": s.pretrain_steps, "batch_size": s.pretrain_batch, "align_steps": s.align_steps,
                "align_batch_size": s.align_batch, "pretrain_version": PRETRAIN_VERSION}
        stale = False
        if (self.base / "cocoa.json").is_file():
            have = json.loads((self.base / "cocoa.json").read_text()).get("extra", {})
            if all(have.get(k) == v for k, v in want.items()):
                self.reuse("pretrain", f"the pre-trained base in {self.base}")
            else:  # an older demo's base: everything trained or scored from it is stale too
                self.say(f"(the base in {self.base} was built with other settings: rebuilding it and what follows)")
                stale = True
        if stale or not (self.base / "cocoa.json").is_file():
            # --overwrite: the commands replace only their own output (cocoa's ownership marker), never a user's
            self.cmd(["cocoa-train", "pretrain-tiny", "--data", str(self.scenes), "--steps", str(s.pretrain_steps),
                      "--batch-size", str(s.pretrain_batch), "--align-steps", str(s.align_steps),
                      "--align-batch-size", str(s.align_batch), "--out", str(self.base)]
                     + (["--overwrite"] if stale else []), "pretrain")

        if s.compare_base:
            self.step("evaluate the base before embedding training (the 'before' column)")
            if not stale and (self.eval_base / "results.json").is_file():
                self.reuse("eval base", f"{self.eval_base / 'results.json'}")
            else:
                self.cmd(self.eval_cmd(self.base, self.eval_base, "base (generative only)") + ["--no-plot"],
                         "eval base")

        self.step("CoCoA training: stage 1 (bidirectional MAE+MNTP), 2 (EOS-bridged reconstruction), 3 (InfoNCE)")
        train = {"stages": "1,2,3", "data": str(self.shards), "model": str(self.base), "preset": "tiny",
                 "out": str(self.run), "stage1": {"steps": s.s1_steps, "batch_size": s.s12_batch},
                 "stage2": {"steps": s.s2_steps, "batch_size": s.s12_batch},
                 "stage3": {"steps": s.s3_steps, "batch_size": s.s3_batch, "micro_batch_size": s.s3_batch}}
        changed = stale or self.run_changed(train)
        if changed:  # an older demo's run (other sizes or preset): cocoa-train would refuse to mix the two
            self.say(f"(the run in {self.run} was trained with other settings: training it again)")
        elif (self.run / "stage3" / "model" / "cocoa.json").is_file():
            self.say("(every stage is finished: cocoa-train skips them)")
        self.cmd(["cocoa-train", *_flags(train)] + (["--overwrite"] if changed else []), "train")

        self.step("evaluation on the scenes benchmark (P@1; embeddings cached on disk)")
        model = self.run / "stage3" / "model"
        extra = ["--compare", str(self.eval_base / "results.json")] if s.compare_base else []
        self.cmd(self.eval_cmd(model, self.eval, "CoCoA 1,2,3") + extra, "eval")

        self.summary(time.time() - t0)
        return 0

    def run_changed(self, train: dict[str, Any]) -> bool:
        """Whether the run in ``self.run`` started a stage with other settings than ``train`` (cocoa-train's own
        comparison, so exactly the case in which it would refuse to resume)."""
        from .config import ConfigError
        from .errors import CocoaError
        from .train.config import TrainConfig, resolve_preset
        from .train.run_dir import settings_diff, started_stages

        prev = self.run / "config.yaml"
        started = started_stages(self.run) if self.run.is_dir() else []
        if not started or not prev.is_file():
            return False
        try:
            old = TrainConfig.from_yaml(prev)
        except (ConfigError, CocoaError, OSError):  # unreadable: cocoa-train says what is wrong with it
            return False
        return bool(settings_diff(old, resolve_preset(TrainConfig.build({}, train, where="")), started))

    def eval_cmd(self, model: Path, out: Path, label: str) -> list[str]:
        return ["cocoa-eval", "--model", str(model), "--benchmark", "scenes", "--data", str(self.scenes),
                "--out", str(out), "--label", label]

    def summary(self, wall: float) -> None:
        self.say("\n=== demo finished")
        w = max(len(t[0]) for t in self.timings)
        for what, dt, how in self.timings:
            self.say(f"  {what:<{w}}  {dt:7.1f} s  {how}")
        self.say(f"  {'total wall time':<{w}}  {wall:7.1f} s")
        res = self.eval / "results.json"
        if res.is_file():
            r = json.loads(res.read_text())
            sp = r.get("splits") or {}
            def pct(v: float | None) -> str:
                return "n/a" if v is None else f"{100 * v:.1f}"

            self.say(f"\nP@1 overall {pct(r.get('overall'))}%  (IND {pct(sp.get('IND'))}%, OOD {pct(sp.get('OOD'))}%)")
        self.say("\nWhere things are:")
        for path, what in [
            (self.eval / "results.md", "score table (markdown)"),
            (self.eval / "results.json", "scores (JSON: per dataset, meta-task, IND/OOD)"),
            (self.eval / "results.png", "bar chart"),
            (self.run / "metrics.jsonl", "training metrics per step"),
            (self.run / "stage3" / "loss.png", "stage-3 loss curve (stage1/, stage2/ likewise)"),
            (self.run / "stage3" / "model", "the embedding model: cocoa.Embedder.from_pretrained(...)"),
            (self.shards / "curated" / "report.json", "curation report"),
            (self.shards / "mix" / "README.md", "mixture dataset card"),
        ]:
            if path.exists():
                self.say(f"  {path}  -- {what}")
        self.say("Re-running reuses all of the above; `make clean` (or deleting the folder) starts over.")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cocoa.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fast", action="store_true", default=os.environ.get("COCOA_DEMO_FAST", "") not in ("", "0"),
                   help="minuscule sizes for a quick smoke run (also: COCOA_DEMO_FAST=1)")
    p.add_argument("--root", type=Path, default=None, help="working folder (default demo/, or demo/fast with --fast)")
    p.add_argument("--quiet", action="store_true", help="hide the commands' own output (only the step lines)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    sizes = FAST if args.fast else FULL
    root = args.root or (Path("demo") / "fast" if args.fast else Path("demo"))
    try:
        return Demo(root, sizes, quiet=args.quiet).main()
    except DemoError as e:
        print(f"\ndemo stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo interrupted; re-run it to continue where it stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
