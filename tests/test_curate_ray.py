"""`cocoa-data curate --engine ray` on a real local Ray cluster (one per module, shut down at the end) writes the
same curated/ and curated/rejected/ rows as the Polars path (the same shards holding the same rows in the same
order: ids, contents, reasons, details) and the same report counts, on a workspace with planted exact and near
duplicates, a pHash near-duplicate image, contaminated and schema-invalid rows, images both embedded and in the
workspace's image store, with a Ray worker SIGKILLed mid-block; a driver SIGKILLed mid-run leaves the previous
curated/ whole."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

ray = pytest.importorskip("ray", reason="needs ray[data] (pip install -e '.[dev]' or '.[ray]')")

from cocoa.cli.data import cli  # noqa: E402
from cocoa.curation.config import CurationConfig  # noqa: E402
from cocoa.curation.pipeline import run_curation  # noqa: E402
from cocoa.curation.ray_engine import run_curation_ray  # noqa: E402
from cocoa.shards import open_dataset  # noqa: E402
from cocoa.testing.curation import planted_workspace  # noqa: E402

CFG = {"image": {"max_pixels": 200_000}}


@pytest.fixture(scope="module")
def cluster():
    """A real local cluster (about 5-15 s to start on 2 cores)."""
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=256 * 2**20, log_to_driver=False,
             logging_level="ERROR")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_workspace(tmp_path_factory.mktemp("planted"), n_images=80, shard_rows=64)


def _rows(f: Path) -> list[dict]:
    """A shard's rows as stored (the Arrow table; the files' bytes may differ in how record batches lay out)."""
    import pyarrow as pa
    from pyarrow import ipc

    return ipc.open_file(pa.memory_map(str(f), "r")).read_all().to_pylist()


def _outputs(ws) -> dict:  # type: ignore[no-untyped-def]
    cur, rej = open_dataset(ws.curated), open_dataset(ws.rejected)
    rep = json.loads((ws.curated / "report.json").read_text())
    return {
        "curated": [_rows(f) for f in cur.files],  # ids, contents, order and shard boundaries
        "rejected": [_rows(f) for f in rej.files],
        "provenance": (cur.manifest.provenance, rej.manifest.provenance),
        "reasons": sorted((q.record_id, q.reason, q.detail) for q in rej),
        "report": {k: rep[k] for k in ("rows_in", "rows_out", "rows_rejected", "kinds_in", "kinds_out",
                                       "distinct_images", "drops", "near_dup", "decontamination")},
    }


def _kill_a_block_worker(killed: list) -> None:
    """SIGKILL the first Ray worker of this test's cluster seen running a block of the block pass."""
    import os
    import signal
    import time

    import psutil

    deadline = time.time() + 60
    while time.time() < deadline:
        for p in psutil.Process().children(recursive=True):  # the local cluster's processes are ours
            try:
                if "MapBatches(_features)" in " ".join(p.cmdline()):
                    os.kill(p.pid, signal.SIGKILL)
                    killed.append(p.pid)
                    return
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.01)


def test_ray_equals_polars_on_planted_workspace_with_a_worker_killed(cluster, planted):
    """... while a Ray worker running a block is SIGKILLed (Ray runs its task again: same rows)."""
    import threading

    ws, ev = planted
    cfg = CurationConfig.build(CFG)
    run_curation(ws.root, cfg, eval_data=ev, show_progress=False)
    want = _outputs(ws)
    killed: list = []
    killer = threading.Thread(target=_kill_a_block_worker, args=(killed,))
    killer.start()
    got_res = run_curation_ray(ws.root, cfg, eval_data=ev, show_progress=False, workers=2, block_rows=50)
    killer.join()
    assert killed, "no block worker was seen to kill"
    got = _outputs(ws)  # the Ray run replaced the Polars run's curated/ through the same staged swap
    reasons = {r for _, r, _ in want["reasons"]}
    # the planted rows are there to be found (so that equality means something)
    assert {"exact_dup_image", "exact_dup_global", "near_dup", "image_near_dup", "decontam_image", "decontam_text",
            "image_unreadable", "length", "refusal", "invalid_record"} <= reasons
    assert want["report"]["near_dup"]["pairs_linked"] >= 4
    assert len(open_dataset(ws.synthetic).files) > 3  # several shards, each cut into blocks of 50 rows
    for k in want:
        assert got[k] == want[k], k
    assert got_res.report["engine"]["name"] == "ray" and got_res.report["engine"]["blocks"] > 6


def test_cli_engine_ray_equals_polars_with_qa_dedup_and_star_buckets(cluster, planted, tmp_path, monkeypatch):
    """Other settings through the command line: QA rows in near and global exact dedup, 32 bands of 4
    permutations (candidate pairs that fail verification), buckets above 2 rows linked as a star; --data
    relative to the working directory (the missing image's detail names it as given)."""
    ws, _ = planted
    conf = tmp_path / "curate.yaml"
    conf.write_text("image: {max_pixels: 200000}\nexact: {global_kinds: [caption, qa]}\n"
                    "near: {kinds: [caption, qa], bands: 32, max_bucket_pairs: 2, threshold: 0.6}\n")
    monkeypatch.chdir(ws.root.parent)
    base = ["curate", "--data", ws.root.name, "--no-progress", "--config", str(conf)]
    r = CliRunner().invoke(cli, base)
    assert r.exit_code == 0, r.output
    want = _outputs(ws)
    r = CliRunner().invoke(cli, [*base, "--engine", "ray", "--ray-address", cluster, "--workers", "3"])
    assert r.exit_code == 0, r.output
    got = _outputs(ws)
    assert want["report"]["drops"]["exact_dup_global"]["count"] > 9  # the QA repeated across images
    assert want["report"]["near_dup"]["pairs_checked"] > want["report"]["near_dup"]["pairs_linked"]
    assert any(f"under {ws.root.name}/synthetic)" in d for _, _, d in want["reasons"])
    for k in want:
        assert got[k] == want[k], k


@pytest.mark.parametrize("flag,value", [("--ray-address", "auto"), ("--workers", "2")])
def test_ray_flags_need_engine_ray(tmp_path, flag, value):
    r = CliRunner().invoke(cli, ["curate", "--data", str(tmp_path), flag, value])
    assert r.exit_code == 2 and f"{flag} needs --engine ray" in r.output


def test_driver_sigkill_mid_run_leaves_the_previous_curated_whole(cluster, planted):
    """The driver is killed while its blocks run on the cluster: curated/ is still the previous run's, whole and
    verified (the new output is staged beside it and swapped in only when complete); the next run succeeds."""
    import os
    import signal
    import subprocess
    import sys
    import time

    ws, ev = planted
    run_curation(ws.root, CurationConfig.build(CFG), show_progress=False)
    before = _outputs(ws)
    cmd = [str(Path(sys.executable).parent / "cocoa-data"), "curate", "--data", str(ws.root), "--no-progress",
           "--image-max-pixels", "200000", "--near-threshold", "0.5", "--eval-data", str(ev), "--engine", "ray",
           "--ray-address", cluster, "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    killed = False
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ray.available_resources().get("CPU", 4.0) < 3.99:  # the driver's tasks hold CPU on the cluster
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert killed, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    assert _outputs(ws) == before  # the previous output, whole (open_dataset verifies every shard)
    res = run_curation_ray(ws.root, CurationConfig.build({**CFG, "near": {"threshold": 0.5}}), eval_data=ev,
                           show_progress=False, workers=2)
    assert res.report["config"]["near"]["threshold"] == 0.5
    assert not list(ws.root.glob(".curated.*"))  # the killed run's staging directory is gone


def test_edges_equal_polars(cluster, tmp_path):
    """Near-dedup rows without a word (no shingles: no band shuffle to run) and a workspace whose every row fails
    a per-row rule (nothing left to compare)."""
    from cocoa.shards import Workspace, write_records
    from cocoa.testing.curation import caption, noise_image

    cases = {
        "no_words": ([caption(f"p{i}", "!!! ???", noise_image(i)) for i in range(3)]
                     + [caption("q", "A red cube sits on the grey floor.", noise_image(9))],
                     {"text": {"caption_min_words": 0}, "exact": {"enabled": False}}),
        "all_rejected": ([caption(f"p{i}", "Short one.", noise_image(i)) for i in range(3)], {}),
    }
    for name, (recs, conf) in cases.items():
        ws = Workspace(tmp_path / name)
        write_records(ws.synthetic, "SynthRecord", recs)
        cfg = CurationConfig.build(conf)
        run_curation(ws.root, cfg, show_progress=False)
        want = _outputs(ws)
        run_curation_ray(ws.root, cfg, show_progress=False, workers=2)
        assert _outputs(ws) == want, name
