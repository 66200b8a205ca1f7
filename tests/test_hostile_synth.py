"""Hostile inputs and faults for `cocoa-data synth` / `cocoa-data scenes` and their sources (issue 12):
two writers on one workspace, --overwrite on foreign directories, tampered source shards, non-UTF-8 text
(MMEB parquet, prompt templates), binary-typed text columns, corrupt images inside a source shard,
templates that fail only at render time, a caller's own teacher, bad input flags, zero usable pairs,
per-backend defaults. Real files, real subprocesses and a real loopback HTTP server."""

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from cocoa.cli.data import cli
from cocoa.datagen.synth import SynthConfig, SynthEmpty, Synthesizer, run_synth
from cocoa.datagen.teachers.base import Teacher, TeacherResult
from cocoa.fs import is_locked
from cocoa.errors import CocoaError
from cocoa.records import ImageRef, PairRecord
from cocoa.shards import open_dataset, write_records


def _cli(*args):
    return CliRunner().invoke(cli, ["synth", "--no-progress", *args], catch_exceptions=False)


def _scene_pairs(n, seed=1):
    """``n`` scene pairs that each have a query image."""
    from cocoa.sources.scenes import iter_train_pairs

    return [p for p in iter_train_pairs(4 * n, seed=seed) if p.qry_image is not None][:n]


# ---------------------------------------------------------------------------------------------
# item 4: one writer per part; sharded workers still run concurrently
# ---------------------------------------------------------------------------------------------
class GatedServer:
    """An OpenAI-compatible chat server on 127.0.0.1 that holds every answer until ``release()``."""

    def __init__(self):
        self.gate = threading.Event()
        self.count = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                outer.count += 1
                outer.gate.wait(60)
                body = json.dumps({"id": "x", "object": "chat.completion", "choices": [{"index": 0, "finish_reason": "stop",
                                   "message": {"role": "assistant",
                                               "content": json.dumps({"caption": "Three small shapes on a grey floor."})}}],
                                   "usage": {"prompt_tokens": 5, "completion_tokens": 9}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 64
            daemon_threads = True

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def _synth_proc(out, url, *extra):
    cmd = [sys.executable, "-m", "cocoa.cli.data", "synth", "--no-progress", "--source", "scenes", "--scenes-n", "16",
           "--tasks", "caption", "--backend", "openai", "--base-url", url, "--model", "m", "--http-retries", "3",
           "--concurrency", "4",
           "--request-timeout", "60", "--out", str(out), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OPENAI_API_KEY": "k"})


def _wait(cond, timeout=60.0):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def _holder(out, part):
    """The pid a worker wrote into its part's lock file once it holds the lock (read without locking:
    probing the flock itself could make a starting worker fail)."""
    try:
        return json.loads((out / f".cocoa-synth-part-0000{part}-of-00002.lock").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def test_second_synth_on_the_same_part_fails_at_once_while_other_parts_run(tmp_path):
    out = tmp_path / "ws"
    server = GatedServer()
    procs = []
    try:
        a = _synth_proc(out, server.url, "--shard-index", "0", "--num-shards", "2")
        procs.append(a)
        _wait(lambda: _holder(out, 0) == a.pid and server.count >= 1)
        b = _synth_proc(out, server.url, "--shard-index", "1", "--num-shards", "2")  # another part: runs
        procs.append(b)
        _wait(lambda: _holder(out, 1) == b.pid or b.poll() is not None)
        assert a.poll() is None, "worker 0 should be waiting on the gated server"
        t0 = time.time()
        dup = _synth_proc(out, server.url, "--shard-index", "0", "--num-shards", "2")  # same part as a
        procs.append(dup)
        dout, derr = dup.communicate(timeout=60)
        assert dup.returncode == 1, dout + derr
        assert "in use by another cocoa process" in derr and f"pid {a.pid}" in derr and "Traceback" not in derr
        assert time.time() - t0 < 30 and a.poll() is None  # failed at once, while the first still runs
        server.gate.set()
        for p in (a, b):
            o, e = p.communicate(timeout=120)
            assert p.returncode == 0, o + e
    finally:
        server.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert not is_locked(out, name=".cocoa-synth-part-00000-of-00002.lock")  # released at exit
    syn = open_dataset(out / "synthetic")  # complete, every shard passes its size/sha check
    assert syn.manifest.complete and len(syn) == sum(1 for _ in syn) > 0
    assert open_dataset(out / "original").manifest.complete and len(open_dataset(out / "original")) == 16


# ---------------------------------------------------------------------------------------------
# item 3: --overwrite deletes only what cocoa made
# ---------------------------------------------------------------------------------------------
def test_overwrite_refuses_a_foreign_directory_and_marks_what_it_creates(tmp_path):
    out = tmp_path / "ws"
    (out / "synthetic").mkdir(parents=True)
    precious = out / "synthetic" / "notes.txt"
    precious.write_text("mine")
    r = _cli("--source", "scenes", "--scenes-n", "2", "--tasks", "caption", "--out", str(out), "--overwrite")
    assert r.exit_code == 1 and "not made by cocoa" in r.output and "Traceback" not in r.output
    assert precious.read_text() == "mine"
    assert not (out / ".cocoa-owned").exists()  # a directory that was not empty is not claimed
    fresh = tmp_path / "fresh"
    assert _cli("--source", "scenes", "--scenes-n", "2", "--tasks", "caption", "--out", str(fresh)).exit_code == 0
    assert (fresh / ".cocoa-owned").is_file()
    r = _cli("--source", "scenes", "--scenes-n", "2", "--tasks", "caption", "--out", str(fresh), "--overwrite")
    assert r.exit_code == 0, r.output  # its own output is replaced


def test_scenes_overwrite_refuses_a_foreign_directory_before_building(tmp_path):
    from cocoa.sources.scenes import build_benchmark
    from cocoa.fs import NotOwnedError

    root = tmp_path / "bench"
    (root / "original").mkdir(parents=True)
    (root / "original" / "thesis.tex").write_text("years of work")
    with pytest.raises(NotOwnedError, match="not made by cocoa"):
        build_benchmark(root, n_train=4, eval_per_task=2, n_distractors=3, datasets=["SceneCls"], overwrite=True)
    assert (root / "original" / "thesis.tex").read_text() == "years of work"
    assert not (root / "eval" / "SceneCls").exists()
    other = tmp_path / "b2"
    build_benchmark(other, n_train=4, eval_per_task=2, n_distractors=3, datasets=["SceneCls"])
    assert (other / ".cocoa-owned").is_file()
    build_benchmark(other, n_train=4, eval_per_task=2, n_distractors=3, datasets=["SceneCls"], overwrite=True)
    assert len(open_dataset(other / "original")) == 4


# ---------------------------------------------------------------------------------------------
# item 5: flipped bytes in a source shard are never used silently
# ---------------------------------------------------------------------------------------------
def test_flipped_bytes_in_a_source_shard_are_refused(tmp_path):
    pairs = _scene_pairs(4)
    src = tmp_path / "src"
    write_records(src, "PairRecord", pairs)
    shard = src / open_dataset(src).manifest.shards[0].file
    data = bytearray(shard.read_bytes())
    needle = pairs[0].pos_text.encode()
    i = bytes(data).index(needle)
    data[i] = ord("X") if data[i] != ord("X") else ord("Y")  # same size, still a readable Arrow file
    shard.write_bytes(bytes(data))
    out = tmp_path / "o"
    r = _cli("--source", "scenes", "--scenes-dir", str(src), "--tasks", "caption", "--out", str(out))
    assert r.exit_code == 1 and "sha256" in r.output and shard.name in r.output and "Traceback" not in r.output
    assert not out.exists()  # refused before anything was created


# ---------------------------------------------------------------------------------------------
# items 6 and 17: non-UTF-8 and binary-typed MMEB text columns; a caller's own teacher
# ---------------------------------------------------------------------------------------------
class CaptionTeacher(Teacher):
    """A user-supplied teacher (the documented extension point): answers every request with a caption."""

    backend, model, batch_size = "mine", "my-captioner", 8

    def __init__(self):
        self.seen = 0

    def generate(self, requests):
        self.seen += len(requests)
        return [TeacherResult(key=r.key, text=json.dumps({"caption": "A bright object in the middle of the frame."}))
                for r in requests]


def _tamper_mmeb_texts(root):
    """Rewrite ImageNet_1K's parquet: `qry` a string column holding invalid UTF-8 in row 1, `pos_text` typed binary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = root / "ImageNet_1K" / "original-00000-of-00001.parquet"
    t = pq.read_table(f)
    qry = [x.encode() for x in t.column("qry").to_pylist()]
    qry[1] = b"<|image_1|>\nRepresent the \xff\xfe given image"
    pos = [x.encode() for x in t.column("pos_text").to_pylist()]
    t = t.set_column(t.schema.get_field_index("qry"), "qry", pa.array(qry, pa.binary()).view(pa.string()))
    t = t.set_column(t.schema.get_field_index("pos_text"), "pos_text", pa.array(pos, pa.binary()))
    pq.write_table(t, f)
    return f, [p.decode() for p in pos]


def test_mmeb_non_utf8_row_is_quarantined_and_binary_text_is_decoded_with_a_given_teacher(tmp_path):
    from cocoa.testing.mmeb import write_mmeb_train_fixture

    root = write_mmeb_train_fixture(tmp_path / "mmeb", subsets=["ImageNet_1K"], n_per_subset=3)
    f, labels = _tamper_mmeb_texts(root)
    teacher = CaptionTeacher()
    # `teacher=` is used as given: no vLLM, no --backend needed (vLLM is not installed here)
    s = run_synth(SynthConfig(source="mmeb", mmeb_dir=str(root), out=str(tmp_path / "o"), tasks=["caption"],
                              progress=False), teacher=teacher)
    assert s.complete and s.pairs == 2 and s.ok == 2 and teacher.seen == 2
    orig = list(open_dataset(tmp_path / "o" / "original"))
    assert sorted(p.pos_text for p in orig) == sorted(labels[i] for i in (0, 2))  # decoded, never "b'...'"
    assert not any(p.pos_text.startswith("b'") for p in orig)
    q = [r for r in open_dataset(tmp_path / "o" / "synthetic" / "quarantine") if r.stage == "source"]
    assert [r.reason for r in q] == ["invalid_utf8"]
    assert "'qry'" in q[0].detail and f.name in q[0].detail and "row 1" in q[0].detail
    assert {r.teacher.backend for r in open_dataset(tmp_path / "o" / "synthetic")} == {"mine"}


def test_mmeb_readers_quarantine_non_utf8_rows_and_decode_binary_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cocoa.sources.mmeb import SourceReport, iter_mmeb_eval, iter_mmeb_train
    from cocoa.testing.mmeb import write_mmeb_eval_fixture, write_mmeb_train_fixture

    root = write_mmeb_train_fixture(tmp_path / "mmeb", subsets=["ImageNet_1K"], n_per_subset=3)
    f, labels = _tamper_mmeb_texts(root)
    rep = SourceReport()
    recs = list(iter_mmeb_train(root, report=rep))
    assert [r.pos_text for r in recs] == [labels[0], labels[2]] and rep.skipped == {"invalid_utf8": 1}
    q = rep.quarantine[0]
    assert "'qry'" in q.detail and "0xff" in q.detail and "row 1" in q.detail and "\\xff" in q.payload
    # MMEB-eval: a bad byte inside a list<string> candidate column
    eroot = write_mmeb_eval_fixture(tmp_path / "eval", datasets=["ImageNet-1K"], n_per_dataset=3)
    ef = eroot / "ImageNet-1K" / "test-00000-of-00001.parquet"
    t = pq.read_table(ef)
    tgt = [[x.encode() for x in row] for row in t.column("tgt_text").to_pylist()]
    tgt[2][1] = b"tabby \xc3("
    arr = pa.array(tgt, pa.list_(pa.binary())).cast(pa.list_(pa.binary()))
    arr = pa.ListArray.from_arrays(arr.offsets, arr.values.view(pa.string()))
    pq.write_table(t.set_column(t.schema.get_field_index("tgt_text"), "tgt_text", arr), ef)
    erep = SourceReport()
    erecs = list(iter_mmeb_eval(eroot, report=erep))
    assert len(erecs) == 2 and erep.skipped == {"invalid_utf8": 1} and "tgt_text" in erep.quarantine[0].detail


def test_non_utf8_prompt_template_is_a_clear_error_before_any_output(tmp_path):
    tdir = tmp_path / "tpl"
    tdir.mkdir()
    (tdir / "caption_natural.j2").write_bytes(b"Caption this \xe9\xff image of {{ kind }}.")
    out = tmp_path / "o"
    r = _cli("--source", "scenes", "--scenes-n", "2", "--tasks", "caption", "--prompts", str(tdir), "--out", str(out))
    assert r.exit_code == 1 and "caption_natural.j2" in r.output and "UTF-8" in r.output
    assert "Traceback" not in r.output and "UnicodeDecodeError" not in r.output
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# item 13: every template is loaded and test-rendered before any output is written
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }} Caption {{ kind }}",                                  # sandbox, every render
    "{% if dataset == 'never' %}{{ k.__class__ }}{% endif %}Caption {{ kind }}",      # sandbox, one branch only
    "Caption the {{ kind }} image of {{ datset }}",                                   # undefined variable
    "{% if role == 'positive' %}{% endif %}",                                         # renders to nothing
])
def test_bad_template_is_refused_before_any_output(tmp_path, template):
    tdir = tmp_path / "tpl"
    tdir.mkdir()
    (tdir / "caption_natural.j2").write_text(template)
    out = tmp_path / "o"
    with pytest.raises(CocoaError, match="caption_natural"):
        run_synth(SynthConfig(source="scenes", scenes_n=2, tasks=["caption"], prompts=str(tdir), out=str(out),
                              progress=False))
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# item 7: a corrupt image inside a source shard goes to quarantine, not to original/
# ---------------------------------------------------------------------------------------------
def test_corrupt_image_in_a_source_shard_is_quarantined_not_copied(tmp_path):
    good = _scene_pairs(3)
    bad = good[0].model_copy(update={"qry_text": "a broken one",
                                     "qry_image": ImageRef(bytes=good[0].qry_image.bytes[:60] + b"\0" * 40)})
    bad = PairRecord(**bad.model_dump(exclude={"id"}))
    neg_bad = PairRecord(**{**good[1].model_dump(exclude={"id"}), "qry_text": "bad negative",
                            "neg_image": ImageRef(bytes=b"\x89PNG\r\n\x1a\ngarbage")})
    src = tmp_path / "src"
    write_records(src, "PairRecord", good + [bad, neg_bad])
    out = tmp_path / "o"
    r = _cli("--source", "scenes", "--scenes-dir", str(src), "--tasks", "caption", "--out", str(out))
    assert r.exit_code == 0, r.output
    ids = {p.id for p in open_dataset(out / "original")}
    assert ids == {p.id for p in good}  # neither broken pair was copied
    q = [x for x in open_dataset(out / "synthetic" / "quarantine") if x.record_id in (bad.id, neg_bad.id)]
    pair_rows = [x for x in q if "not copied to original/" in x.detail]
    assert {x.record_id for x in pair_rows} == {bad.id, neg_bad.id}
    assert all(x.reason == "image_unreadable" and x.stage == "source" for x in pair_rows)
    assert any("negative image" in x.detail for x in pair_rows)
    # rerun: nothing new, nothing lost
    r = _cli("--source", "scenes", "--scenes-dir", str(src), "--tasks", "caption", "--out", str(out))
    assert r.exit_code == 0 and {p.id for p in open_dataset(out / "original")} == ids


# ---------------------------------------------------------------------------------------------
# item 18: inputs are validated before anything is created; the message names the flag typed
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--mmeb-image-dir", "--mmeb-dir", "--scenes-dir"])
def test_bad_input_paths_name_the_flag_and_create_nothing(tmp_path, flag):
    from cocoa.testing.mmeb import write_mmeb_train_fixture

    missing = str(tmp_path / "nonexistent")
    out = tmp_path / "o"
    if flag == "--scenes-dir":
        args = ["--source", "scenes", "--scenes-dir", missing]
    else:
        root = write_mmeb_train_fixture(tmp_path / "mmeb", subsets=["ImageNet_1K"], n_per_subset=1)
        args = ["--source", "mmeb", "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
                "--mmeb-dir", missing if flag == "--mmeb-dir" else str(root)]
        if flag == "--mmeb-image-dir":
            args += ["--mmeb-image-dir", missing]
    r = _cli(*args, "--out", str(out))
    assert r.exit_code == 1 and flag + " " in r.output and missing in r.output and "Traceback" not in r.output
    assert "--image-dir " not in r.output.replace("--mmeb-image-dir", "")
    assert not out.exists()


def test_out_that_is_a_file_is_a_clear_error(tmp_path):
    from cocoa.sources.scenes import build_benchmark

    f = tmp_path / "afile"
    f.write_text("x")
    r = _cli("--source", "scenes", "--scenes-n", "2", "--out", str(f))
    assert r.exit_code == 1 and "--out" in r.output and "is a file" in r.output and "Traceback" not in r.output
    with pytest.raises(CocoaError, match="is a file"):
        build_benchmark(f, n_train=2, eval_per_task=1, n_distractors=2, datasets=["SceneCls"])
    assert f.read_text() == "x"


# ---------------------------------------------------------------------------------------------
# item 19: zero usable pairs is a failure; a large quarantined share is a warning
# ---------------------------------------------------------------------------------------------
def test_missing_image_zips_is_a_failure_with_the_reasons(tmp_path):
    import shutil

    from cocoa.testing.mmeb import write_mmeb_train_fixture

    root = write_mmeb_train_fixture(tmp_path / "mmeb", subsets=["ImageNet_1K", "OK-VQA"], n_per_subset=3)
    shutil.rmtree(root / "images_zip")
    with pytest.raises(SynthEmpty, match=r"no usable source pairs.*missing_image 6"):
        run_synth(SynthConfig(source="mmeb", mmeb_dir=str(root), out=str(tmp_path / "o"), tasks=["caption"],
                              progress=False), teacher=CaptionTeacher())
    r = CliRunner().invoke(cli, ["synth", "--no-progress", "--source", "mmeb", "--mmeb-dir", str(root), "--backend",
                                 "openai", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--out",
                                 str(tmp_path / "o2")])
    assert r.exit_code == 1 and "no usable source pairs" in r.output and "missing_image" in r.output
    assert "dataset complete" not in r.output


def test_large_quarantine_share_prints_a_warning_with_top_reasons(tmp_path):
    good = _scene_pairs(2)
    nograph = [PairRecord(source="Other", qry_text=f"q{i}", qry_image=ImageRef(bytes=g.qry_image.bytes + bytes([i])),
                          pos_text="t", meta={}) for i, g in enumerate(good * 2)]
    src = tmp_path / "src"
    write_records(src, "PairRecord", good + nograph)
    r = _cli("--source", "scenes", "--scenes-dir", str(src), "--tasks", "caption", "--out", str(tmp_path / "o"))
    assert r.exit_code == 0, r.output
    line = [x for x in r.output.splitlines() if x.startswith("warning:")]
    assert line and "4 of " in line[0] and "rejected 4" in line[0] and "quarantine" in line[0]
    clean = _cli("--source", "scenes", "--scenes-n", "3", "--tasks", "caption", "--out", str(tmp_path / "c"))
    assert clean.exit_code == 0 and "warning:" not in clean.output


# ---------------------------------------------------------------------------------------------
# item 24: per-backend defaults that finish a first run quickly; flags still win
# ---------------------------------------------------------------------------------------------
def test_per_backend_defaults_and_help():
    tf = Synthesizer(SynthConfig(source="mmeb", backend="transformers", model="some/model", tasks=["caption"]))
    assert tf.sampling.max_tokens == 256 and tf.max_retries == 1 and tf.params["max_tokens"] == 256
    oa = Synthesizer(SynthConfig(source="mmeb", backend="openai", model="m", tasks=["caption"]))
    assert oa.sampling.max_tokens == 768 and oa.max_retries == 2
    mine = Synthesizer(SynthConfig(source="mmeb", backend="transformers", model="m", max_tokens=900, max_retries=3))
    assert mine.sampling.max_tokens == 900 and mine.max_retries == 3
    sc = Synthesizer(SynthConfig(source="scenes"))  # unchanged keys for existing scenes workspaces
    assert sc.sampling.max_tokens == 768 and sc.max_retries == 2
    h = CliRunner().invoke(cli, ["synth", "--help"]).output
    assert "--max-tokens 256" in h and "--max-tokens 768" in h


def test_quarantine_reasons_counter_in_summary_is_json(tmp_path):
    """The summary line stays machine-readable with the new fields."""
    r = _cli("--source", "scenes", "--scenes-n", "2", "--tasks", "caption", "--out", str(tmp_path / "o"))
    s = json.loads([x for x in r.output.splitlines() if x.startswith('{"summary"')][-1])["summary"]
    assert s["bad_pairs"] == 0 and s["source_skipped"] == {} and Counter(s["records"])["caption"] >= 1
    assert Path(s["out"]).name == "o"


class SurrogateTeacher(CaptionTeacher):
    """A user's teacher whose answers cannot be stored as UTF-8 (a lone surrogate, or not text at all)."""

    backend = "mine-bad"

    def generate(self, requests):
        out = []
        for i, r in enumerate(requests):
            text = '{"caption": "half an emoji \ud83d here"}' if i % 2 == 0 else b'{"caption": "bytes"}'
            out.append(TeacherResult(key=r.key, text=text))
        return out


def test_a_users_teacher_returning_unstorable_text_is_quarantined_with_its_reason(tmp_path):
    src = tmp_path / "src"
    write_records(src / "original", "PairRecord", _scene_pairs(4))
    s = run_synth(SynthConfig(source="scenes", scenes_dir=str(src), out=str(tmp_path / "o"), tasks=["caption"],
                              progress=False), teacher=SurrogateTeacher())
    q = [r for r in open_dataset(tmp_path / "o" / "synthetic" / "quarantine") if r.stage != "source"]
    assert s.quarantined == len(q) == 4 and {r.reason for r in q} == {"rejected"}
    details = sorted(r.detail for r in q)
    assert any("not valid UTF-8" in d and "\\ud83d" in d for d in details)
    assert any("returned bytes, not text" in d for d in details)


# -- audit A: damaged zip members, truncated PNGs, wrongly typed MMEB columns (C6, B5, B4, D19) -----------
def _png(w, h, rows):
    import struct
    import zlib

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * (1 + 3 * w) * rows)) + chunk(b"IEND", b""))


def _damaged_zip(path, good):
    """A zip with one good member and three damaged ones: encrypted flag, bad deflate data, method 99."""
    import zipfile

    names = {k: f"images/ImageNet_1K/Train/z_{k}.png" for k in ("good", "encrypted", "baddeflate", "method99")}
    with zipfile.ZipFile(path, "w") as z:
        for k, n in names.items():
            z.writestr(zipfile.ZipInfo(n), good, compress_type=zipfile.ZIP_DEFLATED)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        for k in ("encrypted", "baddeflate", "method99"):
            lh = z.getinfo(names[k]).header_offset
            start = lh + 30 + int.from_bytes(raw[lh + 26:lh + 28], "little") + int.from_bytes(raw[lh + 28:lh + 30], "little")
            if k == "baddeflate":
                for i in range(2, 40):
                    raw[start + i] ^= 0xFF
            elif k == "encrypted":
                raw[lh + 6] |= 1
            else:
                raw[lh + 8] = 99
    pos = 0
    while (pos := raw.find(b"PK\x01\x02", pos)) >= 0:  # the central directory entries too
        name = bytes(raw[pos + 46:pos + 46 + int.from_bytes(raw[pos + 28:pos + 30], "little")]).decode()
        if name.endswith("z_encrypted.png"):
            raw[pos + 8] |= 1
        if name.endswith("z_method99.png"):
            raw[pos + 10] = 99
        pos += 4
    path.write_bytes(bytes(raw))
    return names


def test_damaged_zip_members_and_truncated_pngs_are_corrupt_image_skips(tmp_path):
    from cocoa.sources.mmeb.images import ImageSource
    from cocoa.sources.mmeb.report import _Skip

    good = _png(32, 32, 32)
    names = _damaged_zip(tmp_path / "i.zip", good)
    src = ImageSource(zips=[tmp_path / "i.zip"])
    assert src.image(names["good"])[0].bytes == good
    for k in ("encrypted", "baddeflate", "method99"):
        with pytest.raises(_Skip) as e:
            src.read(names[k])
        assert e.value.reason == "corrupt_image" and names[k] in e.value.detail, k
    src.close()
    # a PNG whose zlib stream ends after one row: Pillow pads the rest; cocoa refuses it
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "t.png").write_bytes(_png(300, 200, 1))
    with pytest.raises(_Skip) as e:
        ImageSource(dirs=[tmp_path / "d"]).image("t.png")
    assert e.value.reason == "corrupt_image" and "truncated PNG" in e.value.detail
    from PIL import ImageFile
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_mmeb_eval_damaged_zip_member_is_a_counted_skip(tmp_path):
    from cocoa.sources.mmeb import SourceReport, iter_mmeb_eval
    from cocoa.testing.mmeb import write_mmeb_eval_fixture

    eroot = write_mmeb_eval_fixture(tmp_path / "eval", datasets=["ImageNet-1K"], n_per_dataset=2)
    zips = list(eroot.rglob("*.zip"))
    assert zips
    import zipfile
    z = zips[0]
    with zipfile.ZipFile(z) as zf:
        member = next(n for n in zf.namelist() if not n.endswith("/"))
        info = zf.getinfo(member)
    raw = bytearray(z.read_bytes())
    lh = info.header_offset
    start = lh + 30 + int.from_bytes(raw[lh + 26:lh + 28], "little") + int.from_bytes(raw[lh + 28:lh + 30], "little")
    if info.compress_type == zipfile.ZIP_STORED:  # make it a deflate member holding garbage
        raw[lh + 8] = 8
        cd = raw.find(b"PK\x01\x02" , 0)
        while cd >= 0:
            if bytes(raw[cd + 46:cd + 46 + len(member)]) == member.encode():
                raw[cd + 10] = 8
            cd = raw.find(b"PK\x01\x02", cd + 4)
    for i in range(0, 40):
        raw[start + i] ^= 0xA5
    z.write_bytes(bytes(raw))
    rep = SourceReport()
    list(iter_mmeb_eval(eroot, report=rep))  # no zlib.error traceback
    assert rep.skipped.get("corrupt_image", 0) >= 1, rep.skipped


@pytest.mark.parametrize("column,arr,word", [
    ("pos_text", lambda pa, n: pa.array([{"x": 1}] * n), "dict"),
    ("qry", lambda pa, n: pa.array(list(range(n)), pa.int64()), "int"),
    ("qry_image_path", lambda pa, n: pa.array([["a", "b"]] * n), "list"),
])
def test_mmeb_wrongly_typed_text_column_is_quarantined_never_stringified(tmp_path, column, arr, word):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cocoa.sources.mmeb import SourceReport, iter_mmeb_train
    from cocoa.testing.mmeb import write_mmeb_train_fixture

    root = write_mmeb_train_fixture(tmp_path / "mmeb", subsets=["ImageNet_1K"], n_per_subset=2)
    f = root / "ImageNet_1K" / "original-00000-of-00001.parquet"
    t = pq.read_table(f)
    pq.write_table(t.set_column(t.column_names.index(column), column, arr(pa, t.num_rows)), f)
    rep = SourceReport()
    assert list(iter_mmeb_train(root, report=rep)) == []
    assert rep.skipped == {"wrong_type": t.num_rows}
    d = rep.quarantine[0].detail
    assert repr(column) in d and word in d and "missing_image" not in d


def test_mmeb_null_text_stays_empty(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cocoa.sources.mmeb import SourceReport, iter_mmeb_train
    from cocoa.testing.mmeb import write_mmeb_train_fixture

    root = write_mmeb_train_fixture(tmp_path / "mmeb", subsets=["ImageNet_1K"], n_per_subset=2)
    f = root / "ImageNet_1K" / "original-00000-of-00001.parquet"
    t = pq.read_table(f)
    pq.write_table(t.set_column(t.column_names.index("qry"), "qry", pa.array([None] * t.num_rows, pa.string())), f)
    recs = list(iter_mmeb_train(root, report=SourceReport()))
    assert recs and all(r.qry_text == "" for r in recs)
