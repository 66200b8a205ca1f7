"""Hostile teacher servers (issue 12, items 11 and 6): the openai backend against REAL HTTP servers on
127.0.0.1 that answer HTML with status 200, trickle one byte per 0.1 s, refuse every request with the same
4xx, or send text that is not UTF-8. Each answer must end as a retry, a clean stop or a quarantine row
with its reason -- never a silent permanent rejection, a hang or a traceback."""

import json
import os
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

HTML = b"<html><head><title>502 Bad Gateway</title></head><body><h1>Bad Gateway</h1>nginx</body></html>"
PINNED = b'{"error": "Server is pinned to Qwen/Qwen2.5-VL-3B-Instruct, but you requested wrong-model"}'


def _ok(content: str) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 2}}).encode()


@pytest.fixture(scope="module")
def image():
    from cocoa.sources.scenes import iter_train_pairs

    return next(p for p in iter_train_pairs(3) if p.qry_image is not None).qry_image.bytes


def _req(image, key="k"):
    return TeacherRequest(key=key, task="caption", prompt="Describe.", image=image, schema=json_schema("caption"),
                          seed=5, sampling=Sampling(max_tokens=16))


def _teacher(url, **kw):
    kw = {"http_retries": 2, "backoff_base": 0.01, "backoff_max": 0.02, "timeout": 5.0, **kw}
    return OpenAITeacher(url, "teacher-model", **kw)


def _cfg(url, out, **kw):
    kw = {"http_retries": 1, "max_unavailable": 2, **kw}
    return SynthConfig(source="scenes", scenes_n=3, out=str(out), backend="openai", base_url=url, model="teacher-model",
                       tasks=["caption"], progress=False, **kw)


# -- (a) an HTTP 200 that is not a chat completion is transient --------------------------------------
def test_http_200_html_page_is_retried_then_served(server, image):
    s = server(lambda n, d: (200, "text/html", HTML) if n <= 2 else (200, "application/json", _ok('{"caption": "a cube"}')))
    r = _teacher(s.url).generate([_req(image)])[0]
    assert r.text == '{"caption": "a cube"}' and r.transport_attempts == 3 and s.n == 3


@pytest.mark.parametrize("body", [HTML, b"", b'{"object": "error", "message": "upstream overloaded"}', b"[1, 2"])
def test_http_200_without_a_completion_is_unavailable_not_rejected(server, image, body):
    s = server(lambda n, d: (200, "text/html", body))
    r = _teacher(s.url).generate([_req(image)])[0]
    assert r.text is None and r.error_kind == "unavailable" and r.transport_attempts == 3 and s.n == 3
    assert "HTTP 200" in r.error and "not a chat completion" in r.error
    if body == HTML:
        assert "Bad Gateway" in r.error  # the proxy's page is shown, so the user sees who answered


def test_synth_html_answers_are_not_quarantined_and_a_rerun_serves_them(server, tmp_path):
    healthy = {"on": False}
    s = server(lambda n, d: (200, "application/json", _ok('{"caption": "a fine caption"}')) if healthy["on"]
               else (200, "text/html", HTML))
    out = tmp_path / "o"
    with pytest.raises(SynthIncomplete, match="Bad Gateway"):
        run_synth(_cfg(s.url, out))
    assert len(open_dataset(out / "synthetic" / "quarantine", allow_incomplete=True)) == 0  # nothing "rejected"
    healthy["on"] = True
    summ = run_synth(_cfg(s.url, out))
    assert summ.complete and summ.ok == summ.requests == 3 and summ.quarantined == 0
    assert len(open_dataset(out / "synthetic")) == 3


# -- (b) a total deadline per request --------------------------------------------------------------
def test_trickling_server_cannot_defeat_the_request_timeout(server, image):
    body = _ok('{"caption": "' + "x" * 200 + '"}')  # ~300 bytes at 0.1 s each: 30 s if trickled to the end
    s = server(lambda n, d: ("trickle", body, 0.1))
    t0 = time.time()
    r = _teacher(s.url, timeout=1.5, http_retries=0).generate([_req(image)])[0]
    took = time.time() - t0
    assert took < 4.0, f"a 1.5 s request timeout took {took:.1f} s"
    assert r.text is None and r.error_kind == "unavailable" and "1.5 s" in r.error and "timeout" in r.error


def test_slow_but_in_time_answer_is_accepted(server, image):
    body = _ok('{"caption": "ok"}')
    s = server(lambda n, d: ("trickle", body, 0.002))
    r = _teacher(s.url, timeout=5.0, http_retries=0).generate([_req(image)])[0]
    assert r.text == '{"caption": "ok"}'


# -- (c) a systematic failure stops the run ------------------------------------------------------------
def test_the_same_4xx_for_every_request_stops_with_the_servers_message(server, image):
    s = server(lambda n, d: (400, "application/json", PINNED))
    t = _teacher(s.url, concurrency=2)
    with pytest.raises(TeacherError, match="Server is pinned to") as e:
        t.generate([_req(image, f"k{i}") for i in range(40)])
    assert "HTTP 400" in str(e.value) and "--model" in str(e.value)
    assert s.n < 12  # stopped after a few, not one request per item


def test_distinct_or_interleaved_rejections_stay_per_request(server, image):
    # every other request is refused with the same message, the rest are served: a per-request problem
    s = server(lambda n, d: (400, "application/json", b'{"error": "image too small"}') if d["seed"] % 2
               else (200, "application/json", _ok('{"caption": "x"}')))
    reqs = [_req(image, f"k{i}") for i in range(12)]
    for i, r in enumerate(reqs):
        r.seed = i
    res = _teacher(s.url, concurrency=1).generate(reqs)
    assert [r.error_kind for r in res] == [None, "rejected"] * 6
    assert all("image too small" in r.error for r in res[1::2])


def test_cli_synth_with_a_pinned_server_exits_nonzero_and_quarantines_nothing(server, tmp_path):
    s = server(lambda n, d: (400, "application/json", PINNED))
    out = tmp_path / "o"
    exe = str(Path(sys.executable).parent / "cocoa-data")
    p = subprocess.run([exe, "synth", "--source", "scenes", "--scenes-n", "8", "--out", str(out), "--backend", "openai",
                        "--base-url", s.url, "--model", "wrong-model", "--tasks", "caption", "--http-retries", "0",
                        "--no-progress"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "COLUMNS": "200"})
    both = p.stdout + p.stderr
    assert p.returncode != 0, both
    assert "Server is pinned to" in both and "Traceback" not in both, both
    assert s.n < 12
    q = out / "synthetic" / "quarantine"
    assert not (q / "manifest.json").exists() or len(open_dataset(q, allow_incomplete=True)) == 0
    with pytest.raises(ShardError):  # the run did not claim to be complete
        open_dataset(out / "synthetic")


# -- item 6: answers that are not UTF-8 ------------------------------------------------------------------
def test_answer_with_invalid_utf8_bytes_is_rejected_with_its_reason(server, image):
    body = _ok('{"caption": "a red cube XX"}').replace(b"XX", b"\xff\xfe")
    s = server(lambda n, d: (200, "application/json", body))
    r = _teacher(s.url).generate([_req(image)])[0]
    assert r.text is None and r.error_kind == "rejected" and s.n == 1
    assert "not valid UTF-8" in r.error and "a red cube" in r.error
    r.error.encode("utf-8")  # the quarantine row can be written


def test_answer_with_a_lone_surrogate_is_rejected_not_crashing_the_writer(server, tmp_path):
    s = server(lambda n, d: (200, "application/json", _ok('{"caption": "half an emoji \ud83d"}')))
    summ = run_synth(_cfg(s.url, tmp_path / "o"))
    assert summ.complete and summ.ok == 0 and summ.quarantined == 3
    rows = list(open_dataset(tmp_path / "o" / "synthetic" / "quarantine"))
    assert len(rows) == 3 and all(r.reason == "rejected" and "not valid UTF-8" in r.detail for r in rows)


def test_local_backends_text_check_rejects_a_lone_surrogate():
    from cocoa.datagen.teachers.base import checked_result

    ok = checked_result("k", "a red cube ✓", prompt_tokens=2)
    assert ok.text == "a red cube ✓" and ok.error_kind is None and ok.prompt_tokens == 2
    bad = checked_result("k", "half \ud83d emoji")
    assert bad.text is None and bad.error_kind == "rejected" and "\\ud83d" in bad.error and "offset 5" in bad.error
    bad.error.encode("utf-8")  # the quarantine row can be written


# -- audit A: hostile answers and flags (C7, D16, D18, C10, D17, E22) --------------------------------
def _body(content, usage=None):
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}],
                       "usage": usage if usage is not None else {"prompt_tokens": 3, "completion_tokens": 2}})


@pytest.mark.parametrize("raw,reason", [("[" * 100000, "invalid_json"), ("9" * 100000, "invalid_json"),
                                        ('{"caption": ' + "[" * 100000 + "]" * 100000 + "}", None)])
def test_parse_output_refuses_deep_or_huge_json_without_a_traceback(raw, reason):
    from cocoa.datagen.schemas import OutputError, parse_output

    with pytest.raises(OutputError) as e:
        parse_output("caption", raw)
    assert reason is None or e.value.reason == reason


@pytest.mark.parametrize("body", ["[" * 100000, '{"choices": [{"message": {"content": "x"}}], "n": ' + "9" * 100000 + "}"])
def test_deep_or_huge_body_is_not_a_chat_completion(server, image, body):
    s = server(lambda n, d: (200, "application/json", body))
    r = _teacher(s.url, http_retries=0).generate([_req(image)])[0]
    assert r.text is None and r.error_kind == "unavailable" and "not a chat completion" in r.error


@pytest.mark.parametrize("usage", [{"prompt_tokens": 1e999, "completion_tokens": -6000000},
                                   {"prompt_tokens": 6e30, "completion_tokens": "many"},
                                   {"prompt_tokens": float("nan"), "completion_tokens": True}])
def test_absurd_token_counts_count_as_absent(server, image, usage):
    body = json.dumps({"choices": [{"message": {"content": '{"caption": "a cube"}'}}], "usage": usage})
    s = server(lambda n, d: (200, "application/json", body))
    r = _teacher(s.url).generate([_req(image)])[0]
    assert r.text == '{"caption": "a cube"}' and r.prompt_tokens == 0 and r.completion_tokens == 0


def test_users_teacher_token_counts_are_checked_in_the_summary(tmp_path):
    from cocoa.datagen.teachers.base import Teacher, TeacherResult

    class Liar(Teacher):
        backend, model, revision = "mine", "m", ""

        def generate(self, requests):
            return [TeacherResult(r.key, '{"caption": "A red cube in the middle."}', prompt_tokens=-6000000,
                                  completion_tokens=10**40) for r in requests]

    s = run_synth(SynthConfig(source="scenes", scenes_n=2, out=str(tmp_path / "o"), tasks=["caption"], progress=False),
                  teacher=Liar())
    assert s.complete and s.prompt_tokens == 0 and s.completion_tokens == 0


@pytest.mark.parametrize("content,shown", [({"caption": "x"}, '{"caption": "x"}'), (42, "42"), (True, "true")])
def test_non_string_content_is_rejected_with_what_was_sent(server, image, content, shown):
    s = server(lambda n, d: (200, "application/json", _body(content)))
    r = _teacher(s.url).generate([_req(image)])[0]
    assert r.text is None and r.error_kind == "rejected" and shown in r.error and "not text" in r.error


@pytest.mark.parametrize("status,headers,word", [(302, {"Location": "http://elsewhere/v1/chat/completions"}, "redirect"),
                                                 (301, {}, "redirect")])
def test_redirect_stops_the_run_saying_what_it_is(server, image, status, headers, word):
    s = server(lambda n, d: (status, headers, b""))
    with pytest.raises(TeacherError) as e:
        _teacher(s.url).generate([_req(image)])
    assert word in str(e.value) and "--base-url" in str(e.value) and "--model" not in str(e.value)


def test_other_2xx_is_read_like_a_200(server, image):
    s = server(lambda n, d: (203, "application/json", _ok('{"caption": "a cube"}')) if n == 1
               else (204, "application/json", b""))
    t = _teacher(s.url, http_retries=0)
    assert t.generate([_req(image)])[0].text == '{"caption": "a cube"}'
    r = t.generate([_req(image)])[0]
    assert r.error_kind == "unavailable" and "HTTP 204" in r.error and "--model" not in r.error


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/v1", "http://[::1", "ftp://127.0.0.1/x", "127.0.0.1:8000/v1",
                                 "http:///v1", "http://a b/v1"])
def test_malformed_base_url_is_one_line_before_any_output(tmp_path, url):
    from click.testing import CliRunner

    from cocoa.cli.data import cli

    out = tmp_path / "o"
    res = CliRunner().invoke(cli, ["synth", "--source", "scenes", "--scenes-n", "2", "--backend", "openai",
                                   "--model", "m", "--out", str(out), "--base-url", url])
    assert res.exit_code != 0 and "--base-url" in res.output and "Traceback" not in res.output, res.output
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit)
    assert not out.exists()
    with pytest.raises(TeacherError, match="--base-url"):
        OpenAITeacher(url, "m")


@pytest.mark.parametrize("flags,word", [(["--model", ""], "--model"), (["--model", "  "], "--model"),
                                        (["--temperature", "inf"], "temperature"),
                                        (["--temperature", "nan"], "temperature"),
                                        (["--max-tokens", "99999999999"], "max_tokens")])
def test_empty_model_and_absurd_sampling_flags_are_refused(tmp_path, flags, word):
    from click.testing import CliRunner

    from cocoa.cli.data import cli

    out = tmp_path / "o"
    res = CliRunner().invoke(cli, ["synth", "--source", "scenes", "--scenes-n", "2", "--backend", "openai",
                                   "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(out), *flags])
    assert res.exit_code != 0 and word in res.output and not out.exists(), res.output
