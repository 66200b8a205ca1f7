"""bench/curate_bench.py refuses to measure on a loaded machine unless --allow-loaded (issue 16)."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "curate_bench.py"


def test_curate_bench_refuses_a_loaded_machine_without_the_flag(tmp_path):
    # --max-load -1: any load average is above it, so the gate always trips
    r = subprocess.run([sys.executable, str(BENCH), "--rows", "100", "--max-load", "-1", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "load average" in r.stderr and "--allow-loaded" in r.stderr
    assert not (tmp_path / "summary.json").exists()  # no figure written


def _hold_mib(n: int) -> int:
    import time
    buf = bytearray(n * 1024 * 1024)
    for i in range(0, len(buf), 4096):  # touch every page so it is resident
        buf[i] = 1
    time.sleep(0.5)
    return len(buf)


def test_worker_peak_counts_forkserver_grandchildren():
    # curate's image workers are forkserver children (not ours): the bench's worker figure read 0 from
    # RUSAGE_CHILDREN. The /proc sampler must see a worker's peak, and not count the worker's memory as ours.
    import importlib.util
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    spec = importlib.util.spec_from_file_location("curate_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with bench.DescendantPeak(every=0.05) as peak:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("forkserver")) as pool:
            assert pool.submit(_hold_mib, 300).result() == 300 * 1024 * 1024
    assert 300 * 1024 <= peak.peak_kb < 2 * 1024 * 1024, peak.peak_kb
