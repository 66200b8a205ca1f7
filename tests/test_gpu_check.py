"""bench/gpu_check.sh --cpu: the GPU check's code path at toy sizes, with polars, datasets and vllm made
unimportable (the GPU image has none of them), so its first GPU run cannot fail for a reason a CPU catches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("polars", "datasets", "vllm")

# Imported by every Python process started with this directory on PYTHONPATH (the check's children and torchrun
# too): the blocked packages are not found, exactly as if they were not installed.
SITECUSTOMIZE = f'''
import importlib.machinery as _m

_BLOCKED = {BLOCKED!r}
_find = _m.PathFinder.find_spec


def _find_spec(name, path=None, target=None):
    if name.split(".")[0] in _BLOCKED:
        return None
    return _find(name, path, target)


_m.PathFinder.find_spec = staticmethod(_find_spec)
'''


def _env(block_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(block_dir), PYTHON=sys.executable, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               COCOA_GPU_CHECK_THREADS="1", GPU_CHECK_WORK=str(block_dir / "work"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OUT"):
        env.pop(k, None)
    return env


def test_gpu_check_cpu_mode_passes_without_polars_datasets_vllm(tmp_path):
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = _env(block)
    # the block works: those packages cannot be imported in a child started like the check's
    probe = subprocess.run([sys.executable, "-c", "import importlib.util as u, sys; import transformers; "
                            f"sys.exit(any(u.find_spec(m) for m in {BLOCKED!r}))"], env=env, cwd=tmp_path)
    assert probe.returncode == 0
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu", "--no-isolate", "--out", str(out),
                        "--sections", "env,train_bench,attention,precision,fsdp,real_dims_2b,real_dims_3b"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    rep = json.loads((out / "gpu_check.json").read_text())
    assert rep["mode"].startswith("cpu") and rep["ok"]
    secs = rep["sections"]
    assert list(secs) == ["env", "train_bench", "attention", "precision", "fsdp", "real_dims_2b", "real_dims_3b"]
    for name, s in secs.items():
        assert s["status"] == "ok", (name, s.get("error"))
        assert s["forbidden_imported"] == [], name
    assert secs["env"]["optional_present"] == {"polars": False, "datasets": False, "vllm": False,
                                               "flash_attn": False}
    assert [row["stage"] for row in secs["train_bench"]["rows"]] == ["stock", 1, 2, 3, "3 DoRA", "3 DoRA, dropout 0",
                                                                     "3 LoRA"]
    assert len(secs["precision"]["rows"]) == 3 and len(secs["attention"]["rows"]) == 2
    fs = secs["fsdp"]
    assert fs["exit"] == 0 and all(fs["sharded_optimizer_files"].values()) and fs["reloaded_params"] == fs["params"]
    for name in ("real_dims_2b", "real_dims_3b"):
        assert secs[name]["failures"] == [] and set(secs[name]["stages"]) == {"1", "2", "3"}
    assert not any((tmp_path / "block" / "work").iterdir())  # scratch models and data removed, never under OUT
    assert {p.name for p in out.iterdir()} == {"gpu_check.json", "gpu_check.md", "logs", "sections"}
    md = (out / "gpu_check.md").read_text()
    for text in ("| train_bench | ok", "stock HF (causal LM loss)", "FlexAttention", "bf16 vs fp32", "FSDP2, one process",
                 "real_dims_3b"):
        assert text in md, text


def test_gpu_check_isolated_section_and_failure_are_reported(tmp_path):
    """On the GPU every section runs in its own process: one that fails is recorded with its error and the next
    still runs; an unknown section is one line."""
    env = _env(tmp_path)
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--out", str(out), "--sections", "env,precision"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    rep = json.loads((out / "gpu_check.json").read_text())
    # without --cpu on a machine without CUDA: each section fails cleanly in its own process, naming the fix
    assert r.returncode == 1 and rep["mode"] == "gpu"
    for name in ("env", "precision"):
        assert rep["sections"][name]["status"] == "error"
        assert "no CUDA device" in rep["sections"][name]["error"] and "--cpu" in rep["sections"][name]["error"]
        assert (out / "logs" / f"{name}.log").is_file()
    assert "| precision | error |" in (out / "gpu_check.md").read_text()
    bad = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu", "--out", str(out), "--sections", "nope"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown section(s) ['nope']" in bad.stderr
