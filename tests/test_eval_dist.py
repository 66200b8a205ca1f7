"""cocoa-eval under torchrun: 2 CPU processes (gloo) share the encoding; same scores as one process."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(tiny_model_dir, scenes_root, tmp_path):
    from cocoa.eval import EvalResult, evaluate
    from cocoa.eval.cache import EmbeddingCache

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    args = ["--model", str(tiny_model_dir), "--data", str(scenes_root), "--datasets", "SceneCls,SceneI2T",
            "--limit", "2", "--batch-size", "4", "--no-plot"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [torchrun or sys.executable, *([] if torchrun else ["-m", "torch.distributed.run"]), "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "cocoa.cli.eval", *args,
           "--cache-dir", str(tmp_path / "dist-cache"), "--out", str(tmp_path / "dist")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    dist = EvalResult.load(tmp_path / "dist")
    assert dist.encode["world_size"] == 2 and dist.encode["encoded"] == dist.encode["unique_inputs"]
    assert "Overall" in p.stdout and p.stdout.count("Overall") == 1  # only rank 0 reports
    # each rank wrote its own share to the cache
    chunks = list((tmp_path / "dist-cache").rglob("chunk-*.keys"))
    assert len(chunks) == 2
    sizes = [len(c.read_text().split()) for c in chunks]
    assert sum(sizes) == dist.encode["unique_inputs"] and abs(sizes[0] - sizes[1]) <= 1

    single = evaluate(tiny_model_dir, "scenes", data=scenes_root, datasets=["SceneCls", "SceneI2T"], limit=2,
                      batch_size=4, cache_dir=tmp_path / "one-cache", write=False, quiet=True, device="cpu")
    assert single.model_hash == dist.model_hash and single.datasets == dist.datasets
    a = EmbeddingCache(tmp_path / "dist-cache", dist.model_hash)
    b = EmbeddingCache(tmp_path / "one-cache", dist.model_hash)
    keys = b.keys()
    assert a.missing(keys) == []
    np.testing.assert_allclose(a.get(keys), b.get(keys), atol=1e-5)
    assert json.loads((tmp_path / "dist" / "results.json").read_text())["encode"]["world_size"] == 2
