"""bench/ablation.py: the experiment's rules (early stopping, checkpoint choice, compute equivalence, the task
graph the sweeps unlock, the report's paired comparisons) on result files written the way the workers write
them, and its ``--quick`` mode end to end through the real CLI (every arm, both sweeps, the mechanism)."""

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name, file):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ab():
    return _load("ablation_bench", "ablation.py")


def test_early_stopping_and_checkpoint_choice(ab):
    # stop once `patience` evaluations in a row have not beaten the best before them
    assert not ab.should_stop({0: 0.1, 100: 0.2}, 2)
    assert not ab.should_stop({0: 0.1, 100: 0.2, 200: 0.15}, 2)
    assert ab.should_stop({0: 0.1, 100: 0.2, 200: 0.15, 300: 0.2}, 2)  # a tie is no gain
    assert not ab.should_stop({0: 0.1, 100: 0.2, 200: 0.15, 300: 0.21}, 2)
    assert ab.should_stop({0: 0.1, 100: 0.1}, 1)
    # the best validation step; ties go to the earliest; a limit restricts the choice
    assert ab.best_step({0: 0.1, 100: 0.3, 200: 0.3, 300: 0.2}) == 100
    assert ab.best_step({0: 0.1, 100: 0.3, 200: 0.35}, limit=100) == 100


def test_compute_equivalence(ab):
    st = ab.Settings(s1_steps=200, s2_steps=200, s12_batch=16, s3_batch=32, eval_every=100)
    # 400 steps x 16 sequences = 6,400 sequences = 100 stage-3 steps (64 sequences each)
    assert st.pre_cost("1,2,3") == 100
    assert st.pre_cost("2,3") == 100  # 50 steps, rounded up to a checkpoint interval
    assert st.pre_cost("3") == 0


def test_task_graph_unlocks_with_the_choices(ab, tmp_path):
    st = ab.Settings()
    paths = ab.Paths(tmp_path)
    first = {t.name: t for t in ab.plan_tasks(paths, st, {})}
    # before any choice: the baseline's lr sweep and every configuration's stages 1,2 (seed 0)
    assert sorted(n for n in first if n.startswith("s3-")) == ["s3-lr0.0001-seed0", "s3-lr0.0003-seed0", "s3-lr0.001-seed0"]
    assert sorted(n for n in first if n.startswith("pre-")) == ["pre-dora-12-seed0", "pre-full-12-seed0",
                                                                "pre-full-strict-12-seed0"]
    second = {t.name: t for t in ab.plan_tasks(paths, st, {"s3_lr": 3e-4})}
    assert {"s123-full-lr0.0003-seed0", "s123-dora-lr0.0003-seed0", "s123-full-strict-lr0.0003-seed0"} < set(second)
    assert second["s123-dora-lr0.0003-seed0"].deps == ["pre-dora-12-seed0"]
    # the baseline's other seeds need only the lr: they run during the configuration sweep
    assert {"s3-lr0.0003-seed1", "s3-lr0.0003-seed2"} < set(second) and not second["s3-lr0.0003-seed1"].deps
    assert not any(n.startswith(("s13-", "s23-", "mech-")) for n in second)
    full = {t.name: t for t in ab.plan_tasks(paths, st, {"s3_lr": 3e-4, "config": "dora"})}
    for seed in (0, 1, 2):
        for arm in ("s3", "s123", "s23", "s13"):
            assert ab.s3_name(arm, "dora", 3e-4, seed) in full
        assert f"mech-seed{seed}" in full
    # 1,3 reads the stage-1 model of the same seed's 1,2 run; 2,3 a stage-2-only run from the base
    s13 = full["s13-dora-lr0.0003-seed1"]
    assert s13.deps == ["pre-dora-12-seed1"] and s13.info["input"].endswith(os.path.join("train", "stage1", "model"))
    assert full["s23-dora-lr0.0003-seed1"].deps == ["pre-dora-2-seed1"]
    assert full["s3-lr0.0003-seed2"].info["input"] == str(paths.base)
    # a sweep of one value needs no choice: with one configuration its stage 1-2 runs for every seed start at once,
    # with one lr too, every task is known before anything has run (no slot waits on seed 0's runs)
    one_cfg = ab.Settings(configs={"full-strict": st.configs["full-strict"]})
    pre = {t.name for t in ab.plan_tasks(paths, one_cfg, {}) if t.kind == "pre"}
    assert pre == {f"pre-full-strict-{s}-seed{seed}" for s in ("12", "2") for seed in (0, 1, 2)}
    both = ab.Settings(configs=one_cfg.configs, s3_lrs=[3e-4])
    known = {t.name: t for t in ab.plan_tasks(paths, both, {})}
    assert set(known) == {t.name for t in ab.plan_tasks(paths, both, {"s3_lr": 3e-4, "config": "full-strict"})}
    assert {f"mech-seed{seed}" for seed in (0, 1, 2)} < set(known) and "s13-full-strict-lr0.0003-seed2" in known
    base_only = ab.Settings(configs=one_cfg.configs, arms=["s3"])
    assert {t.name for t in ab.plan_tasks(paths, base_only, {}) if t.kind == "pre"} == {
        f"pre-full-strict-12-seed{seed}" for seed in (0, 1, 2)}  # the mechanism's stage 1,2 runs
    # commands: stage 3 identical across arms but for the input; DoRA only in stages 1-2
    c3 = ab.s3_command(paths, st, "x", paths.base, 3e-4, 1)
    assert c3[c3.index("--lora-method") + 1] == "full" and c3[c3.index("--stage3-schedule") + 1] == "constant"
    assert c3[c3.index("--stage3-save-every") + 1] == str(st.eval_every)
    pre = ab.pre_command(paths, st, "dora", "1,2", 1)
    assert pre[pre.index("--lora-method") + 1] == "dora" and "--lora-train-vision" in pre
    assert pre[pre.index("--stage1-image-mask-ratio") + 1] == "0.3"
    strict = ab.pre_command(paths, st, "full-strict", "2", 0)
    assert strict[strict.index("--stage2-mask-variant") + 1] == "strict" and "--stage1-steps" not in strict


def test_split_seeds_are_flags_for_repeating_on_unseen_splits(ab, tmp_path, monkeypatch):
    paths = ab.Paths(tmp_path / "fresh")
    st = ab.settings_from(ab.parse(["--root", str(paths.root), "--val-seed", "303", "--test-seed", "404"]), paths)
    assert (st.val_seed, st.test_seed, st.train_seed, st.pretrain_seed) == (303, 404, 0, 7)
    # the scenes builds take them (the runner records each command instead of running it)
    ran = []
    monkeypatch.setattr(ab, "sh", lambda paths, cmd, *a, **k: ran.append(cmd) or 0.0)
    ab.prepare(paths, st, threads=1)
    seeds = {c[c.index("--out") + 1]: c[c.index("--seed") + 1] for c in ran if c[:2] == ["cocoa-data", "scenes"]}
    assert seeds == {str(paths.pretrain): "7", str(paths.train): "0", str(paths.val): "303", str(paths.test): "404"}
    # validation and test must be different scenes sets
    with pytest.raises(SystemExit, match="four different seeds"):
        ab.settings_from(ab.parse(["--root", str(tmp_path / "x"), "--val-seed", "5", "--test-seed", "5"]), ab.Paths(tmp_path / "x"))
    # a root keeps the splits it was started with
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.settings.write_text(json.dumps(asdict(st)))
    with pytest.raises(SystemExit, match="test_seed"):
        ab.settings_from(ab.parse(["--root", str(paths.root), "--val-seed", "303", "--test-seed", "405"]), paths)


def _result(ab, st, arm, seed, best, eq, val=0.2):
    cols = {c: best for c in ab.COLUMNS}
    colb = {c: eq for c in ab.COLUMNS}
    return {"arm": arm, "seed": seed, "val_curve": {"0": 0.0, "100": val}, "stopped": {"step": 300},
            "best": {"step": 100, "val": val, "test": {**cols, "datasets": {"SceneCls": best}, "chance": 0.02}},
            "equal_compute": {"step": 100, "val": val, "test": {**colb, "datasets": {"SceneCls": eq}, "chance": 0.02}},
            "step0_val": 0.01, "seconds": {"wall": 10.0}}


def test_report_pairs_seeds_against_the_baseline(ab, tmp_path):
    st = ab.Settings(seeds=[0, 1, 2])
    paths = ab.Paths(tmp_path)
    ch = {"s3_lr": 3e-4, "config": "full"}
    ab.atomic_json(paths.choices, ch)
    for seed in st.seeds:
        for arm, (best, eq) in {"s3": (0.20, 0.20), "s123": (0.25, 0.15), "s23": (0.18, 0.18),
                                "s13": (0.20, 0.20)}.items():
            r = _result(ab, st, arm, seed, best + 0.01 * seed, eq + 0.01 * seed)
            ab.atomic_json(paths.runs / ab.s3_name(arm, "full", 3e-4, seed) / "result.json", r)
    rep = ab.build_report(paths, st)
    a = rep["comparisons"]["equal_stage3_budget_vs_baseline"]
    b = rep["comparisons"]["equal_total_compute_vs_baseline"]
    assert a["s123"]["mean"] == pytest.approx(0.05) and a["s123"]["wins"] == 3 and a["s123"]["n"] == 3
    assert b["s123"]["mean"] == pytest.approx(-0.05) and b["s123"]["wins"] == 0
    assert a["s23"]["mean"] == pytest.approx(-0.02) and a["s13"]["wins"] == 0  # a tie is not a win
    md = paths.report_md.read_text()
    assert "+5.0 ± 0.0 (3/3 seeds better)" in md and "-5.0 ± 0.0 (0/3 seeds better)" in md


def test_materialized_checkpoint_matches_what_cocoa_train_saves(ab):
    """The spec a materialised stage-3 checkpoint gets equals the one cocoa-train saves with the finished
    model (same attention, max length, stages): checked against cocoa-train's preset."""
    from cocoa.train.config import PRESETS

    assert PRESETS["tiny"]["stage3"]["max_length"] == ab.S3_MAX_LENGTH


def test_quick_mode_end_to_end(ab, tmp_path, tiny_model_dir):
    """Every arm, both sweeps (one choice each), the mechanism and the report, through the real CLI. The base
    is the session's fresh tiny model (generative pre-training has its own tests; the experiment reuses a base
    it finds), which saves the suite a pre-training run."""
    import shutil

    root = tmp_path / "abl"
    shutil.copytree(tiny_model_dir, root / "base")
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    cmd = [sys.executable, str(ROOT / "bench" / "ablation.py"), "--root", str(root), "--quick", "--seeds", "0",
           "--s3-lrs", "0.001", "--configs", "full", "--png", str(tmp_path / "c.png")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads((root / "report.json").read_text())
    assert set(rep["arms"]) == {"s3", "s123", "s23", "s13"}
    assert rep["choices"]["s3_lr"] == 0.001 and rep["choices"]["config"] == "full"
    mech = rep["mechanism"]
    assert set(mech) == {"base", "stage 1", "stages 1,2", "stage 2 alone"}
    for row in mech.values():
        assert {"probe_count", "probe_colors_f1", "swap_acc_own", "swap_acc_swapped", "zero_shot_val"} <= set(row)
    for arm in rep["arms"]:
        r = json.loads(next((root / "runs").glob(f"{arm}-*seed0/result.json")).read_text())
        assert r["best"]["step"] in {int(k) for k in r["val_curve"]}
        assert set(r["best"]["test"]["datasets"]) >= {"SceneCls", "SceneCls-OOD"}  # test has IND and OOD
        assert not (root / "runs" / r["name"] / "train" / "stage3" / "checkpoints").exists()  # cleaned up
    val = json.loads(next((root / "runs").glob("s3-*/evals/val-step-000000/results.json")).read_text())
    assert not any(n.endswith("-OOD") for n in val["datasets"])  # validation: IND only
    assert (tmp_path / "c.png").stat().st_size > 10_000
    # resumable: a rerun finds everything done and trains nothing
    p2 = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p2.returncode == 0 and "started" not in p2.stdout, p2.stdout[-2000:]
    assert "Sweep 1" in (root / "report.md").read_text()
    # settings are fixed per root
    p3 = subprocess.run(cmd[:-2] + ["--patience", "3"], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p3.returncode != 0 and "other settings" in (p3.stderr + p3.stdout)
    assert asdict(ab.Settings())["s3_max_steps"] == 1600
