"""Kill safety: SIGKILL `cocoa-data synth` at several points, rerun, compare with an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from cocoa.datagen.synth import SynthConfig, part_name, run_synth
from cocoa.shards import ShardError, open_dataset

N = 40
ARGS = ["--source", "scenes", "--scenes-n", str(N), "--commit-every", "2", "--batch-size", "2", "--no-progress"]


def _cmd(out):
    return [sys.executable, "-m", "cocoa.cli.data", "synth", *ARGS, "--out", str(out)]


def _rows(manifest):
    try:
        return json.loads(manifest.read_text())["num_rows"]
    except (OSError, ValueError, KeyError):
        return 0


def _run_and_kill(out, ready, timeout=120.0):
    """Start synth, SIGKILL it as soon as ``ready()`` holds; return the exit status."""
    p = subprocess.Popen(_cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    t0 = time.time()
    try:
        while p.poll() is None and time.time() - t0 < timeout:
            if ready():
                p.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, p.stderr.read().decode()


def _records(path):
    recs = list(open_dataset(path))
    return Counter(r.id for r in recs), Counter(getattr(r, "key", "") for r in recs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "shards"
    s = run_synth(SynthConfig(source="scenes", scenes_n=N, out=str(out), progress=False))
    assert s.complete and s.quarantined == 0
    return out, s


def test_sigkill_at_several_points_then_rerun_equals_uninterrupted(tmp_path, reference):
    ref, ref_summary = reference
    total_rows = sum(ref_summary.records.values())
    out = tmp_path / "shards"
    part = part_name(0, 1)
    syn_part = out / "synthetic" / "parts" / part / "manifest.json"
    orig_part = out / "original" / "parts" / part / "manifest.json"

    # 1) as soon as the first synthetic shard is committed
    rc, err = _run_and_kill(out, lambda: _rows(syn_part) > 0)
    assert rc == -signal.SIGKILL, f"synth ended on its own before the kill (rc {rc}): {err[-2000:]}"
    first = _rows(syn_part)
    assert 0 < first < total_rows
    with pytest.raises(ShardError, match="incomplete"):
        open_dataset(out / "synthetic")

    # 2) mid-way: once about half of the rows are committed (the rerun resumed, did not restart)
    rc, err = _run_and_kill(out, lambda: _rows(syn_part) >= total_rows // 2)
    assert rc == -signal.SIGKILL, f"synth ended on its own before the kill (rc {rc}): {err[-2000:]}"
    mid = _rows(syn_part)
    assert first < mid < total_rows
    with pytest.raises(ShardError, match="incomplete"):
        open_dataset(out / "original")

    # 3) right after the restart has rewritten its manifests (nothing new committed yet, maybe a little)
    start = syn_part.stat().st_mtime_ns
    rc, _ = _run_and_kill(out, lambda: syn_part.stat().st_mtime_ns != start or _rows(orig_part) >= N)
    assert rc == -signal.SIGKILL

    # 4) finish
    done = subprocess.run(_cmd(out), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads([x for x in done.stdout.splitlines() if x.startswith('{"summary"')][-1])["summary"]
    assert summary["complete"] and summary["skipped"] > 0 and summary["ok"] < ref_summary.ok

    for sub in ("synthetic", "original", "synthetic/quarantine"):
        ids, keys = _records(out / sub)
        ref_ids, _ = _records(ref / sub)
        assert all(n == 1 for n in ids.values()), f"{sub}: duplicate records"
        assert set(ids) == set(ref_ids), f"{sub}: record sets differ from the uninterrupted run"
        assert open_dataset(out / sub).manifest.complete
    # each request's rows are all there: one caption per caption key, k QA rows per QA key
    recs = list(open_dataset(out / "synthetic"))
    per_key = Counter((r.key, r.kind) for r in recs)
    assert {n for (k, kind), n in per_key.items() if kind == "caption"} == {1}
    ref_per_key = Counter((r.key, r.kind) for r in open_dataset(ref / "synthetic"))
    assert per_key == ref_per_key
