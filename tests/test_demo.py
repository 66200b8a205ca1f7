"""`make demo` end to end with minuscule sizes (`python -m cocoa.demo --fast`): every step through the real
`cocoa-*` commands in subprocesses, ending with the score table and the report files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

COMMANDS = [
    "$ cocoa-data scenes",
    "$ cocoa-data synth --source scenes",
    "$ cocoa-data curate",
    "$ cocoa-data mix --ratio 1:1",
    "$ cocoa-train pretrain-tiny",
    "$ cocoa-train --stages 1,2,3",
    "$ cocoa-eval",
]


def _run_demo(root: Path, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, COCOA_CACHE=str(cache), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return subprocess.run([sys.executable, "-m", "cocoa.demo", "--fast", "--quiet", "--root", str(root)],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_fast_demo_runs_the_whole_pipeline(tmp_path):
    root, cache = tmp_path / "demo", tmp_path / "cache"
    r = _run_demo(root, cache)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    # every step printed its command before running it, in pipeline order
    pos = [out.find(c) for c in COMMANDS]
    assert all(p >= 0 for p in pos), [c for c, p in zip(COMMANDS, pos) if p < 0]
    assert pos == sorted(pos)
    assert "--eval-data" in out  # curation decontaminates against the benchmark's own eval sets
    res = json.loads((root / "eval" / "results.json").read_text())
    assert len(res["datasets"]) == 10 and {"IND", "OOD"} <= set(res["splits"])
    assert res["overall"] is not None
    assert {d.split("-")[0] for d in res["datasets"]} == {"SceneCls", "SceneVQA", "SceneT2I", "SceneI2T", "SceneGround"}
    spec = json.loads((root / "runs" / "cocoa" / "stage3" / "model" / "cocoa.json").read_text())
    assert spec["stages"] == [1, 2, 3]
    base = json.loads((root / "base" / "cocoa.json").read_text())
    assert base["extra"].get("pretrained") == "generative"
    assert "total wall time" in out and str(root / "eval" / "results.md") in out

    # an older demo's folder: a run trained with other settings is trained again (cocoa-train alone would refuse
    # to mix the two), through cocoa-train's own --overwrite; a re-run with the same settings reuses it
    cfg = root / "runs" / "cocoa" / "config.yaml"
    assert yaml.safe_load(cfg.read_text())["stage1"]["schedule"] == "constant"
    cfg.write_text(cfg.read_text().replace("schedule: constant", "schedule: linear", 1))  # stage 1's
    assert yaml.safe_load(cfg.read_text())["stage1"]["schedule"] == "linear"
    r2 = _run_demo(root, cache)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert "trained with other settings: training it again" in r2.stdout and "--overwrite" in r2.stdout
    assert yaml.safe_load(cfg.read_text())["stage1"]["schedule"] == "constant"
    r3 = _run_demo(root, cache)
    assert r3.returncode == 0 and "every stage is finished" in r3.stdout and "--overwrite" not in r3.stdout
    # a base built with other settings is rebuilt, and what follows with it; a file of the user's in the
    # demo's eval folder stays (only the commands' own outputs are replaced)
    meta = root / "base" / "cocoa.json"
    m = json.loads(meta.read_text())
    m["extra"]["steps"] = m["extra"]["steps"] + 1
    meta.write_text(json.dumps(m))
    (root / "eval" / "my-notes.txt").write_text("mine")
    r4 = _run_demo(root, cache)
    assert r4.returncode == 0, r4.stdout[-3000:] + r4.stderr[-3000:]
    assert "was built with other settings" in r4.stdout and "trained with other settings" in r4.stdout
    assert json.loads(meta.read_text())["extra"]["steps"] == m["extra"]["steps"] - 1
    assert (root / "eval" / "my-notes.txt").read_text() == "mine"
