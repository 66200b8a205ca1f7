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
