"""bench/ablation.py: the experiment's bookkeeping -- settings checks, the commands each arm runs, and the
report's two comparisons (same stage-3 budget; same total budget read at the right stage-3 checkpoint),
computed from result files written the way the workers write them. The end-to-end run is
`python bench/ablation.py --smoke` (minutes), not part of the suite."""

import importlib.util
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ab():
    spec = importlib.util.spec_from_file_location("ablation_bench", ROOT / "bench" / "ablation.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ablation_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


def _settings(ab):
    return ab.Settings(seeds=[0, 1, 2], s1_steps=20, s2_steps=20, s3_steps=100, eval_every=20)


def _write_run(ab, paths, st, arm, seed, score):
    """A result.json as the worker writes it; P@1 at stage-3 step t is score(t)."""
    curve = {}
    for t in st.eval_steps(arm):
        v = score(t)
        curve[str(t)] = {"overall": v, **{m: v for m in ab.META_TASKS}, "IND": v + 0.01, "OOD": v - 0.01,
                         "datasets": {"SceneCls": v, "SceneCls-OOD": v}}
    r = {"arm": arm, "seed": seed, "stages": ab.ARMS[arm][0], "command": "cocoa-train ...", "curve": curve,
         "final": curve[str(st.s3_steps)], "seconds": {"train": 10.0, "eval": 5.0, "stage3": 8.0},
         "settings": asdict(st)}
    d = paths.run_dir(ab.run_name(arm, seed))
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps(r))


def test_report_compares_at_equal_stage3_and_equal_total_budget(ab, tmp_path):
    st = _settings(ab)
    paths = ab.Paths(tmp_path)
    # baseline: P@1 = t/200 (+ seed noise); CoCoA arms: a head start of 0.1 at every step
    for seed in st.seeds:
        noise = 0.01 * seed
        _write_run(ab, paths, st, "s3", seed, lambda t: t / 200 + noise)
        for arm in ("s13", "s23", "s123", "s123-orig"):
            _write_run(ab, paths, st, arm, seed, lambda t: t / 200 + 0.1 + noise)
    rep = ab.build_report(paths, st)
    a, b = rep["comparisons"]["same_stage3_budget"], rep["comparisons"]["same_total_budget"]
    # (a): everyone at stage-3 step 100
    assert all(a[arm]["step3"] == 100 for arm in a)
    assert a["s3"]["overall"]["mean"] == pytest.approx(0.5 + 0.01)
    assert a["s3"]["overall"]["std"] == pytest.approx(0.01)
    assert a["s123"]["overall"]["mean"] == pytest.approx(0.6 + 0.01)
    # (b): stage 1-2 steps come out of stage 3's: 1,3 and 2,3 at 80, 1,2,3 at 60, the baseline at 100
    assert b["s3"]["step3"] == 100 and b["s13"]["step3"] == 80 and b["s23"]["step3"] == 80
    assert b["s123"]["step3"] == 60 and b["s123-orig"]["step3"] == 60
    assert b["s123"]["overall"]["mean"] == pytest.approx(0.3 + 0.1 + 0.01)
    # paired differences to the baseline, per seed
    da = rep["comparisons"]["same_stage3_budget_vs_baseline"]["s123"]
    db = rep["comparisons"]["same_total_budget_vs_baseline"]["s123"]
    assert da["mean"] == pytest.approx(0.1) and da["wins"] == 3 and da["n"] == 3
    assert db["mean"] == pytest.approx(-0.1) and db["wins"] == 0
    assert rep["arms"]["s3"]["curve"][100]["mean"] == pytest.approx(0.51)
    md = paths.report_md.read_text()
    assert "(a) same stage-3 budget" in md and "(b) same total step budget" in md
    assert "+10.0 ± 0.0 (3/3 seeds better)" in md and "-10.0 ± 0.0 (0/3 seeds better)" in md
    png = ab.plot_curves(paths, st, tmp_path / "curves.png")
    assert png.is_file() and png.stat().st_size > 10_000


def test_commands_per_arm(ab, tmp_path):
    st = _settings(ab)
    paths = ab.Paths(tmp_path)
    cmds = {arm: ab.train_command(paths, st, arm, 1) for arm in ab.ARMS}
    for arm, cmd in cmds.items():
        assert cmd[:3] == ["cocoa-train", "--stages", ab.ARMS[arm][0]]
        assert cmd[cmd.index("--model") + 1] == str(paths.base)  # every arm starts from the same base
        assert cmd[cmd.index("--seed") + 1] == "1"
        assert cmd[cmd.index("--stage3-schedule") + 1] == "constant"
        assert float(cmd[cmd.index("--stage3-warmup-ratio") + 1]) * st.s3_steps == pytest.approx(st.s3_warmup_steps)
    assert "--stage1-steps" not in cmds["s3"] and "--stage2-steps" not in cmds["s13"]
    assert "--stage1-steps" in cmds["s123"] and "--stage2-steps" in cmds["s123"]
    # synthetic off: stages 1-2 read the original-only mixture; the full arm reads mix/
    orig = cmds["s123-orig"]
    assert orig[orig.index("--stage1-data") + 1] == str(paths.orig_mix.resolve())
    assert orig[orig.index("--stage2-data") + 1] == str(paths.orig_mix.resolve())
    assert "--stage1-data" not in cmds["s123"]


def test_scored_steps_and_checkpoint_interval(ab, tmp_path):
    """The curve every --eval-every steps, plus the step comparison (b) reads even when it is off that grid;
    checkpoints are saved at every scored step."""
    st = ab.Settings(s1_steps=50, s2_steps=50, s3_steps=400, eval_every=100)
    st.check()
    assert st.eval_steps("s3") == [0, 100, 200, 300, 400]
    assert st.eval_steps("s13") == st.eval_steps("s23") == [0, 100, 200, 300, 350, 400]
    assert st.eval_steps("s123") == [0, 100, 200, 300, 400]
    assert st.save_every == 50
    cmd = ab.train_command(ab.Paths(tmp_path), st, "s13", 0)
    assert cmd[cmd.index("--stage3-save-every") + 1] == "50"
    assert ab.Settings(s1_steps=30, s2_steps=20, s3_steps=200, eval_every=40).save_every == 10


def test_settings_checks(ab, tmp_path):
    with pytest.raises(SystemExit, match="multiple of --eval-every"):
        ab.Settings(s3_steps=100, eval_every=30).check()
    with pytest.raises(SystemExit, match="comparison \\(b\\)"):
        ab.Settings(s1_steps=50, s2_steps=50, s3_steps=100, eval_every=10).check()
    with pytest.raises(SystemExit, match="unknown arm"):
        ab.Settings(arms=["s3", "s4"]).check()
    # an existing experiment with other settings is not mixed with new ones
    paths = ab.Paths(tmp_path)
    args = ab.parse(["--root", str(tmp_path), "--s3-steps", "120", "--eval-every", "20", "--s1-steps", "20",
                     "--s2-steps", "20"])
    st = ab.settings_from(args, paths)
    paths.settings.write_text(json.dumps(asdict(st)))
    args2 = ab.parse(["--root", str(tmp_path), "--s3-steps", "160", "--eval-every", "20", "--s1-steps", "20",
                      "--s2-steps", "20"])
    with pytest.raises(SystemExit, match="s3_steps"):
        ab.settings_from(args2, paths)
    assert math.isnan(ab.mean_std([])[0])


def test_skip_leaves_runs_out_of_this_scheduling_only(ab, tmp_path, capsys):
    st = _settings(ab)
    paths = ab.Paths(tmp_path)
    ab.schedule(paths, st, jobs=2, threads=1, plan=True, skip=("s123-orig-seed2", "s23-seed0"))
    planned = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ cocoa-train")]
    assert len(planned) == 15 - 2
    assert not any("runs/s123-orig-seed2 " in p or "runs/s23-seed0 " in p for p in planned)
    with pytest.raises(SystemExit, match="--skip names no run"):
        ab.schedule(paths, st, jobs=2, threads=1, plan=True, skip=("s123-seed9",))
