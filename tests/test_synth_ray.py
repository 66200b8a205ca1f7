"""`cocoa-data synth --engine ray` on a real local Ray cluster (one per module, shut down at the end): the records
equal the local engine's, a driver SIGKILLed mid-run then rerun loses and duplicates nothing, and a teacher actor
SIGKILLed mid-run is restarted by Ray Data and its batch retried: the run completes by itself, equal to the local
engine's."""

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


def _teacher_actors() -> dict[int, str]:
    """pid -> process title of every live teacher actor on this node (Ray titles an actor's worker process
    ``ray::<class>`` when idle and ``ray::<class>.<method>`` while it runs one; the pool's actors are
    ``MapWorker(MapBatches(TeacherActor))``)."""
    found = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            title = (Path("/proc") / d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::MapWorker(MapBatches(TeacherActor))"):
            found[int(d)] = title
    return found


def _pool_left(before: set[int], within: float = 30.0) -> set[int]:
    """The teacher actors this run started that are still alive ``within`` seconds after it ended (none, once
    the cluster has torn the job's actors down; that happens after the driver exits, not before, so a restarted
    actor may still be starting up when the driver returns)."""
    deadline = time.time() + within
    while True:
        left = set(_teacher_actors()) - before
        if not left or time.time() > deadline:
            return left
        time.sleep(0.1)


def test_teacher_actor_sigkill_mid_run_is_restarted_and_the_run_completes_by_itself(cluster, local_reference,
                                                                                     tmp_path):
    root = tmp_path / "shards"
    total = len(local_reference["synthetic"])
    # --batch-size 1: one request per actor call, so the scenes teacher's run lasts several seconds (~280 calls)
    cmd = [str(BIN / "cocoa-data"), "synth", "--source", "scenes", "--scenes-n", "120", "--out", str(root),
           "--no-progress", "--commit-every", "4", "--batch-size", "1", "--engine", "ray", "--ray-address", cluster,
           "--workers", "2"]
    before = set(_teacher_actors())  # none of this run's
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    part = root / "synthetic" / "parts" / "part-00000-of-00001" / "manifest.json"
    killed = None
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                rows = json.loads(part.read_text())["num_rows"]
            except (OSError, ValueError, KeyError):
                rows = 0
            alive = _teacher_actors()
            busy = {pid: t for pid, t in alive.items() if pid not in before and t.endswith(".submit")}
            if rows >= 8 and busy:  # an actor is inside a batch: its requests are in flight
                pid = min(busy)
                assert pid != proc.pid
                os.kill(pid, signal.SIGKILL)
                killed = (pid, rows, time.time() - t0)
                break
            time.sleep(0.01)
        # after the kill: a new actor process takes the dead one's place (Ray Data's restart)
        replaced = set()
        while killed and proc.poll() is None and not replaced:
            replaced = set(_teacher_actors()) - before - set(alive)  # not the other actor of the pool
            time.sleep(0.01)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert killed is not None, f"the run ended before an actor could be killed: {err[-2000:] if proc.stderr else ''}"
    pid, rows_at_kill, t_kill = killed
    print(f"actor {pid} killed {t_kill:.1f} s into the run with {rows_at_kill}/{total} records committed; "
          f"replaced by {sorted(replaced)}; the run took {time.time() - t0:.1f} s")
    assert 0 < rows_at_kill < total  # mid-run: records were outstanding when the actor died
    assert replaced  # Ray Data restarted the actor (a new process) to retry its batch
    assert proc.returncode == 0, f"the run did not survive its actor's death:\n{err[-3000:]}"
    summary = json.loads(out.strip().splitlines()[-1])["summary"]
    # one run did it all: nothing was skipped (no rerun), every request finished, nothing is missing
    assert summary["complete"] and summary["skipped"] == 0 and summary["ok"] == summary["requests"] > 0
    got = _records(root)  # complete manifests, or this raises
    for d in DIRS:
        assert got[d] == local_reference[d], d  # nothing lost, same contents
    for d in ("synthetic", "original"):
        ids = Counter(json.loads(x)["id"] for x in got[d])
        assert max(ids.values()) == 1  # nothing duplicated (the retried batch was written once)
    assert not _pool_left(before)  # the run's pool is gone, the restarted actor included


def test_a_batch_whose_actor_keeps_dying_stops_the_run_in_one_line_and_a_rerun_completes(cluster, local_reference,
                                                                                         tmp_path):
    """Ray Data would retry such a batch forever; cocoa bounds it (ray_engine._BATCH_RETRIES): killing the busy
    actor again and again (each kill fails every batch in flight on it) stops the run with one line naming the
    rerun; committed work stays, the outputs stay incomplete, and the rerun completes, equal to the local engine."""
    root = tmp_path / "shards"
    cmd = [str(BIN / "cocoa-data"), "synth", "--source", "scenes", "--scenes-n", "120", "--out", str(root),
           "--no-progress", "--commit-every", "4", "--batch-size", "1", "--engine", "ray", "--ray-address", cluster,
           "--workers", "1"]
    before = set(_teacher_actors())
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    kills = []
    try:
        while time.time() - t0 < 180 and proc.poll() is None and len(kills) < 30:
            busy = [pid for pid, t in _teacher_actors().items()
                    if pid not in before and pid not in kills and t.endswith(".submit")]
            if busy:
                os.kill(busy[0], signal.SIGKILL)
                kills.append(busy[0])
            time.sleep(0.005)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    print(f"{len(kills)} actor kills; the run stopped after {time.time() - t0:.1f} s: {err.strip().splitlines()[-1:]}")
    assert proc.returncode not in (0, None) and len(kills) > 3, (proc.returncode, kills, err[-3000:])
    last = err.strip().splitlines()[-1]
    assert "a teacher actor died 4 times running the same batch (Actor" in last, err[-3000:]
    assert "rerun the same command" in last
    with pytest.raises(Exception, match="incomplete"):
        open_dataset(root / "synthetic")
    assert not _pool_left(before)  # the run's pool is gone
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = _records(root)
    for d in DIRS:
        assert got[d] == local_reference[d], d
