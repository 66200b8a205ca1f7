"""The openai backend against real HTTP servers on loopback: a misbehaving socket server (500s, stalls,
429, 401, 400) and `transformers serve` with the offline tiny model."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loopback import server  # noqa: F401 (the fixture)

from cocoa.datagen.schemas import json_schema
from cocoa.datagen.synth import SynthConfig, SynthIncomplete, run_synth
from cocoa.datagen.teachers.base import Sampling, TeacherError, TeacherRequest
from cocoa.datagen.teachers.openai import OpenAITeacher
from cocoa.shards import ShardError, open_dataset

SECRET = "sk-test-SECRET-0123456789"


def _ok(content: str) -> tuple:
    body = {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                                                    "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7}}
    return 200, {}, json.dumps(body)


@pytest.fixture(scope="module")
def image():
    from cocoa.sources.scenes import iter_train_pairs

    p = next(p for p in iter_train_pairs(3) if p.qry_image is not None)
    return p.qry_image.bytes


def _req(image, key="k", task="caption"):
    return TeacherRequest(key=key, task=task, prompt="Describe.", image=image, schema=json_schema(task),
                          seed=5, sampling=Sampling(max_tokens=32))


def _teacher(url, **kw):
    kw = {"http_retries": 3, "backoff_base": 0.01, "backoff_max": 0.05, "timeout": 5.0, **kw}
    return OpenAITeacher(url, "teacher-model", **kw)


def test_retries_5xx_with_backoff_then_succeeds(server, image):
    s = server(lambda n, d: (500, {}, '{"error": "boom"}') if n <= 2 else _ok('{"caption": "a red cube"}'))
    r = _teacher(s.url).generate([_req(image)])[0]
    assert r.text == '{"caption": "a red cube"}' and r.transport_attempts == 3 and len(s.requests) == 3
    assert r.prompt_tokens == 11 and r.completion_tokens == 7
    body = s.requests[0][1]
    img, text = body["messages"][0]["content"]
    assert img["image_url"]["url"].startswith("data:image/png;base64,") and text["text"] == "Describe."
    assert body["response_format"]["type"] == "json_schema" and body["seed"] == 5 and body["max_tokens"] == 32
    assert body["response_format"]["json_schema"]["schema"] == json_schema("caption")


def test_persistent_500_is_bounded_and_reported_unavailable(server, image):
    s = server(lambda n, d: (503, {}, "overloaded"))
    t0 = time.time()
    res = _teacher(s.url, http_retries=2).generate([_req(image, "a"), _req(image, "b")])
    assert time.time() - t0 < 10
    assert len(s.requests) == 6  # 2 requests x (1 + 2 retries)
    for r in res:
        assert r.text is None and r.error_kind == "unavailable" and r.transport_attempts == 3 and "HTTP 503" in r.error


def test_stalling_server_times_out_with_retries(server, image):
    s = server(lambda n, d: ("stall", 3.0))
    t0 = time.time()
    r = _teacher(s.url, http_retries=1, timeout=0.4).generate([_req(image)])[0]
    assert time.time() - t0 < 5 and len(s.requests) == 2
    assert r.error_kind == "unavailable" and "timeout" in r.error and r.transport_attempts == 2


def test_429_retry_after_then_ok_and_400_is_a_rejection(server, image):
    s = server(lambda n, d: (429, {"Retry-After": "0"}, "slow down") if n == 1 else
               (400, {}, '{"error": "prompt too long"}') if d["seed"] == 99 else _ok('{"caption": "x"}'))
    t = _teacher(s.url)
    assert t.generate([_req(image)])[0].text == '{"caption": "x"}'
    bad = _req(image)
    bad.seed = 99
    r = t.generate([bad])[0]
    assert r.error_kind == "rejected" and "prompt too long" in r.error and r.transport_attempts == 1


def test_api_key_is_sent_but_never_shown(server, image, monkeypatch):
    monkeypatch.setenv("COCOA_TEST_KEY", SECRET)
    s = server(lambda n, d: (401, {}, '{"error": "invalid key"}'))
    t = _teacher(s.url, api_key_env="COCOA_TEST_KEY")
    with pytest.raises(TeacherError) as e:
        t.generate([_req(image)])
    assert s.requests[0][0]["Authorization"] == f"Bearer {SECRET}"
    assert SECRET not in str(e.value) and "$COCOA_TEST_KEY" in str(e.value)
    assert SECRET not in repr(t) and SECRET not in str(vars(t).get("base_url"))


def test_vllm_structured_outputs_extra_body(server, image):
    s = server(lambda n, d: _ok('{"caption": "x"}'))
    _teacher(s.url, structured="vllm").generate([_req(image, task="qa")])
    body = s.requests[0][1]
    assert body["structured_outputs"] == {"json": json_schema("qa")} and "response_format" not in body
    _teacher(s.url, structured="none").generate([_req(image)])
    assert "structured_outputs" not in s.requests[1][1] and "response_format" not in s.requests[1][1]


def _cfg(url, out, **kw):
    return SynthConfig(source="scenes", scenes_n=4, out=str(out), backend="openai", base_url=url, model="teacher-model",
                       tasks=["caption"], http_retries=1, progress=False, **kw)


def test_synth_retries_invalid_output_with_a_new_seed(server, tmp_path):
    seen_seeds: dict[str, list[int]] = {}

    def behave(n, d):
        prompt = d["messages"][0]["content"][1]["text"]
        seen_seeds.setdefault(d["messages"][0]["content"][0]["image_url"]["url"][-40:], []).append(d["seed"])
        first = len(seen_seeds[d["messages"][0]["content"][0]["image_url"]["url"][-40:]]) == 1
        return _ok("Sure! Here is a caption: a cube" if first else json.dumps({"caption": "a scene: " + prompt[:10]}))

    s = server(behave)
    summ = run_synth(_cfg(s.url, tmp_path / "o"))
    assert summ.complete and summ.ok == summ.retried == summ.requests > 0 and summ.quarantined == 0
    assert all(len(v) == 2 and v[0] != v[1] for v in seen_seeds.values())  # a retry uses a new seed
    recs = list(open_dataset(tmp_path / "o" / "synthetic"))
    assert {r.meta["attempts"] for r in recs} == {2} and {r.teacher.backend for r in recs} == {"openai"}


def test_synth_outage_ends_incomplete_then_resumes(server, tmp_path):
    healthy = {"on": False}

    def behave(n, d):
        if not healthy["on"] and n > 2:
            return 500, {}, "down"
        return _ok('{"caption": "a fine caption"}')

    s = server(behave)
    out = tmp_path / "o"
    with pytest.raises(SynthIncomplete, match="rerun"):
        run_synth(_cfg(s.url, out))
    with pytest.raises(ShardError, match="incomplete"):
        open_dataset(out / "synthetic")
    assert len(open_dataset(out / "synthetic", allow_incomplete=True)) == 2  # finished work was committed
    healthy["on"] = True
    before = len(s.requests)
    summ = run_synth(_cfg(s.url, out))
    assert summ.complete and summ.skipped == 2 and summ.ok == summ.requests - 2
    assert len(s.requests) - before == summ.ok
    assert len(open_dataset(out / "synthetic")) == summ.requests and summ.quarantined == 0


# -- transformers serve with the tiny model ----------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tf_server(tiny_model_dir, tmp_path_factory):
    exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
    if exe is None:
        pytest.fail("the `transformers` CLI (transformers[serving]) is not installed; pip install -e '.[dev]'")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w+")
    p = subprocess.Popen([exe, "serve", str(tiny_model_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                         stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    import httpx

    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            if p.poll() is not None:
                log.seek(0)
                pytest.fail(f"transformers serve exited ({p.returncode}): {log.read()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() - t0 > 180:
                pytest.fail("transformers serve did not become healthy in 180 s")
            time.sleep(0.5)
        yield url + "/v1"
    finally:
        p.terminate()
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        log.close()


def test_transformers_serve_tiny_model_output_lands_in_quarantine(tf_server, tiny_model_dir, tmp_path):
    cfg = SynthConfig(source="scenes", scenes_n=2, out=str(tmp_path / "o"), backend="openai", base_url=tf_server,
                      model=str(tiny_model_dir), tasks=["caption", "qa"], max_tokens=8, max_retries=1,
                      http_retries=1, request_timeout=120, concurrency=2, progress=False)
    s = run_synth(cfg)
    assert s.complete and s.requests == 4 and s.unavailable == 0
    assert s.quarantined == 4 and s.ok == 0 and s.completion_tokens > 0
    q = list(open_dataset(tmp_path / "o" / "synthetic" / "quarantine"))
    assert len(q) == 4 and len(open_dataset(tmp_path / "o" / "synthetic")) == 0
    for row in q:
        assert row.stage == "synth" and row.reason in ("invalid_json", "empty") and row.detail
        assert row.meta["attempts"] == 2 and row.raw == row.meta["raws"][-1]
        assert row.meta["teacher"] == {"backend": "openai", "model": str(tiny_model_dir), "revision": ""}
    assert any(row.raw for row in q)  # the tiny model's raw text is kept
