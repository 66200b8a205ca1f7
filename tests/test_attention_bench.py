"""bench/attention_bench.py runs end to end on CPU with the tiny config (the same code path as on an H100)."""

import importlib.util
import io
import math
from contextlib import redirect_stdout
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "attention_bench.py"


def test_attention_bench_tiny_cpu():
    spec = importlib.util.spec_from_file_location("attention_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    buf = io.StringIO()
    with redirect_stdout(buf):
        res = mod.main(["--size", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0"])
    text = buf.getvalue()
    attn, steps = res["attention"], res["steps"]
    assert [r["L"] for r in attn] == [64, 128]
    # FlexAttention agrees with the dense collaborative mask (fp32 on CPU)
    assert all(r["flex_rel_err"] < 1e-4 for r in attn)
    names = [r["name"] for r in steps if r["name"] != "_shape"]
    assert names[0].startswith("causal") and any(n.startswith("stage 2 collaborative, dense") for n in names)
    timed = [r for r in steps if r["name"] != "_shape" and "error" not in r]
    assert len(timed) == 4 and all(math.isfinite(r["ms"]) and r["ms"] > 0 for r in timed)
    assert "ratio vs the causal step" in text and "target: stage-2" in text
