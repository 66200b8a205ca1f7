"""bench/train_bench.py runs on CPU with a tiny config: the same code path as the H100 benchmark."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "train_bench.py"


def test_train_bench_tiny_cpu(tmp_path):
    import torch

    spec = importlib.util.spec_from_file_location("train_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = mod.main(["--size", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0",
                        "--chunk", "2", "--json", str(tmp_path / "r.json")])
    finally:
        torch.set_num_threads(n)
    assert json.loads((tmp_path / "r.json").read_text())["size"] == "tiny"
    assert [r["stage"] for r in out["stages"]] == [1, 2, 3]
    for r in out["stages"]:
        assert r["step_s"] > 0 and r["tokens"] > 0 and r["tokens_per_s"] > 0
        assert 0 < r["mfu"] < 1 and 0 <= r["padding_share"] < 1 and math.isfinite(r["loss"])
    assert out["peak_tflops"] > 0 and out["stage2_vs_stage3_per_token"] > 0
