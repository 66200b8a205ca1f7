"""`cocoa-data synth --engine ray` on a real local Ray cluster (one per module, shut down at the end): the records
equal the local engine's, and a driver SIGKILLed mid-run then rerun loses and duplicates nothing."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="needs ray[data] (pip install -e '.[dev]' or '.[ray]')")

from cocoa.datagen.synth import SynthConfig, run_synth  # noqa: E402
from cocoa.datagen.synth.ray_engine import RaySynthesizer  # noqa: E402
from cocoa.shards import open_dataset  # noqa: E402

BIN = Path(sys.executable).parent
DIRS = ("original", "synthetic", "synthetic/quarantine")


@pytest.fixture(scope="module")
def cluster():
    """A real local cluster (about 5-15 s to start on 2 cores); fractional CPUs per actor (docs/synth.md)."""
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=256 * 2**20, log_to_driver=False,
             logging_level="ERROR")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _records(root: Path) -> dict[str, list[str]]:
    out = {}
    for d in DIRS:
        ds = open_dataset(root / d)  # complete and verified, or this raises
        out[d] = sorted(r.model_dump_json() for r in ds)
    return out


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("local") / "shards"
    run_synth(SynthConfig(source="scenes", scenes_n=120, out=str(root), progress=False, commit_every=16))
    return _records(root)


def test_ray_engine_equals_the_local_engine(cluster, local_reference, tmp_path):
    root = tmp_path / "shards"
    s = RaySynthesizer(SynthConfig(source="scenes", scenes_n=120, out=str(root), progress=False, commit_every=16,
                                   engine="ray", workers=2)).run()
    assert s.complete and s.ok > 0 and s.unavailable == 0
    got = _records(root)
    for d in DIRS:
        assert got[d] == local_reference[d], d  # same ids, same contents (images: the same store references)
    again = RaySynthesizer(SynthConfig(source="scenes", scenes_n=120, out=str(root), progress=False,
                                       engine="ray", workers=2)).run()
    assert again.ok == 0 and again.skipped == again.requests > 0  # a rerun skips every finished key
    assert _records(root) == got


def test_driver_sigkill_mid_run_then_rerun_loses_and_duplicates_nothing(cluster, local_reference, tmp_path):
    root = tmp_path / "shards"
    cmd = [str(BIN / "cocoa-data"), "synth", "--source", "scenes", "--scenes-n", "120", "--out", str(root),
           "--no-progress", "--commit-every", "4", "--batch-size", "2", "--engine", "ray", "--ray-address", cluster,
           "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    part = root / "synthetic" / "parts" / "part-00000-of-00001" / "manifest.json"
    killed_at = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            m = json.loads(part.read_text())
        except (OSError, ValueError):
            m = None
        if m and m["num_rows"] > 0 and not m["complete"]:
            os.kill(proc.pid, signal.SIGKILL)  # the driver only: the cluster (and its actors' job cleanup) lives on
            killed_at = m["num_rows"]
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert killed_at is not None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    m = json.loads(part.read_text())
    assert not m["complete"] and m["num_rows"] < sum(1 for _ in local_reference["synthetic"])
    with pytest.raises(Exception, match="incomplete"):
        open_dataset(root / "synthetic")  # readers refuse the killed run's output
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = _records(root)
    for d in DIRS:
        assert got[d] == local_reference[d], d  # nothing lost
    for d in ("synthetic", "original"):
        ids = Counter(json.loads(x)["id"] for x in got[d])
        assert max(ids.values()) == 1  # nothing duplicated
    summary = json.loads(r.stdout.strip().splitlines()[-1])["summary"]
    assert summary["skipped"] > 0 and summary["complete"]
