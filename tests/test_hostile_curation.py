"""Hostile inputs against curate, mix and inspect: tampered outputs, foreign directories, two writers,
schema-invalid rows inside a shard, an MMEB-eval directory as --eval-data, a synth run whose every output
was quarantined, ratios with a zero side. Real files, real `cocoa-data` subprocesses, real SIGSTOP/SIGCONT."""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner

from cocoa.cli.data import cli
from cocoa.testing.curation import caption, noise_image, pair, qa, unique_sentence
from cocoa.records import QuarantineRecord, RecordError, from_row, schema_for, to_row
from cocoa.shards import MANIFEST, ShardWriter, Workspace, open_dataset, write_records

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def _cocoa_data(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([str(BIN / "cocoa-data"), *args], capture_output=True, text=True, timeout=timeout, env=env)


class _Result:
    def __init__(self, returncode: int, out: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, out, out


def _in_process(*args: str) -> _Result:
    """The same command through click in this process (real files; no interpreter start-up)."""
    r = CliRunner().invoke(cli, list(args))
    return _Result(r.exit_code, r.output + ("" if r.exception is None or isinstance(r.exception, SystemExit)
                                            else f"Traceback: {r.exception!r}"))


def _workspace(root: Path, n: int = 8) -> Workspace:
    """synthetic/ (captions + QA) and original/ (image->text and text->image pairs)."""
    ws = Workspace(root)
    syn = []
    for i in range(n):
        im = noise_image(700 + i)
        syn.append(caption(f"p{i}", unique_sentence(3000 + i), im))
        syn.append(qa(f"p{i}", f"What is item {i} made of?", f"Material {unique_sentence(4000 + i, 3)}", im))
    write_records(ws.synthetic, "SynthRecord", syn)
    orig = [pair("vqa", qry_text=f"q{i}?", qry_image=noise_image(800 + i), pos_text=f"answer {i}") for i in range(n)]
    orig += [pair("ret", qry_text=f"a photo {i}", pos_image=noise_image(900 + i)) for i in range(n)]
    write_records(ws.original, "PairRecord", orig)
    return ws


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    return r.stderr + r.stdout


# ---------------------------------------------------------------------------------------------
# items 2, 3: rewriting curated/ and mix/ deletes nothing outside them, and nothing foreign
# ---------------------------------------------------------------------------------------------
def test_tampered_output_manifests_cannot_make_curate_or_mix_delete_outside_files(tmp_path):
    ws = _workspace(tmp_path / "ws")
    outside = tmp_path / "precious"
    outside.mkdir()
    absolute, climbing = outside / "absolute.arrow", outside / "climbing.arrow"
    for f in (absolute, climbing):
        f.write_bytes(b"the user's own file")
    assert _in_process("curate", "--data", str(ws.root), "--no-progress").returncode == 0
    assert _in_process("mix", "--data", str(ws.root), "--no-progress").returncode == 0

    for out in (ws.curated, ws.mix):  # both outputs now list the user's files as their own shards
        m = json.loads((out / MANIFEST).read_text())
        m["shards"] += [{"file": str(absolute), "num_rows": 0, "bytes": 19, "sha256": "0" * 64},
                        {"file": "../../precious/climbing.arrow", "num_rows": 0, "bytes": 19, "sha256": "0" * 64}]
        (out / MANIFEST).write_text(json.dumps(m))

    r = _cocoa_data("curate", "--data", str(ws.root), "--no-progress")
    assert r.returncode == 0, r.stderr  # the old output is never read: it is rebuilt and swapped in
    r = _cocoa_data("mix", "--data", str(ws.root), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert absolute.read_bytes() == climbing.read_bytes() == b"the user's own file"
    assert len(open_dataset(ws.curated)) == 16 and len(open_dataset(ws.mix)) == 32
    assert not list(ws.root.glob(".curated.*")) and not list(ws.root.glob(".mix.*"))  # no staging left behind


@pytest.mark.parametrize("command", ["curate", "mix"])
def test_a_foreign_output_directory_is_refused_before_any_work(tmp_path, command):
    ws = _workspace(tmp_path / "ws")
    if command == "mix":
        assert _in_process("curate", "--data", str(ws.root), "--no-progress").returncode == 0
    else:
        import shutil

        shutil.rmtree(ws.curated, ignore_errors=True)
    out = ws.curated if command == "curate" else ws.mix  # a directory someone else filled
    out.mkdir()
    (out / "notes.arrow").write_bytes(b"mine")
    (out / "notes.txt").write_text("mine")
    r = _in_process(command, "--data", str(ws.root), "--no-progress")
    msg = _one_line_error(r)
    assert "cocoa did not write" in msg and str(out) in msg
    assert (out / "notes.arrow").read_bytes() == b"mine" and (out / "notes.txt").read_text() == "mine"


def test_a_killed_run_leaves_staging_that_the_next_run_removes(tmp_path):
    ws = _workspace(tmp_path / "ws")
    from cocoa.fs import mark_owned

    stale = ws.root / ".curated.tmp-999999"  # what a SIGKILLed curate leaves
    mark_owned(stale, "curated")
    (stale / "shard-00000.arrow").write_bytes(b"half")
    r = _in_process("curate", "--data", str(ws.root), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert not stale.exists() and len(open_dataset(ws.curated)) == 16


# ---------------------------------------------------------------------------------------------
# item 4: one writer per workspace (real processes; the first is frozen while it holds the lock)
# ---------------------------------------------------------------------------------------------
def test_second_curate_or_mix_on_a_workspace_fails_at_once(tmp_path):
    ws = _workspace(tmp_path / "ws", n=150)
    assert _in_process("curate", "--data", str(ws.root), "--no-progress").returncode == 0  # for mix's input
    lock = ws.root / ".cocoa.lock"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _attempt in range(3):
        first = subprocess.Popen([str(BIN / "cocoa-data"), "curate", "--data", str(ws.root), "--no-progress"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 60
        held = False
        while time.monotonic() < deadline and first.poll() is None:
            try:
                held = json.loads(lock.read_text() or "{}").get("pid") == first.pid
            except (OSError, ValueError):
                held = False
            if held:
                os.kill(first.pid, signal.SIGSTOP)  # frozen while holding the lock
                break
            time.sleep(0.005)
        if held and first.poll() is None:
            break
        first.communicate(timeout=60)
        assert held, "curate ran to the end without taking the workspace lock"
        # it finished between taking the lock and being frozen: try again
    else:
        pytest.skip("the first curate always finished before it could be frozen")
    try:
        for cmd in ("curate", "mix"):
            t0 = time.monotonic()
            r = _cocoa_data(cmd, "--data", str(ws.root), "--no-progress", timeout=60)
            msg = _one_line_error(r)
            assert "in use by another cocoa process" in msg and f"pid {first.pid}" in msg and "curate" in msg
            assert time.monotonic() - t0 < 30  # at once, not after waiting
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert len(open_dataset(ws.curated)) == 300


# ---------------------------------------------------------------------------------------------
# item 10: schema-invalid rows inside a shard are rejected where curate reads them, with the rule
# ---------------------------------------------------------------------------------------------
def _bad_rows(good: dict) -> dict[str, dict]:
    """Rows that fit the Arrow schema but are not valid SynthRecords (what a foreign or edited shard holds)."""
    t = good["teacher"]
    return {
        "kind": {**good, "kind": "summary"},
        "meta_not_json": {**good, "meta": "{not json"},
        "meta_not_object": {**good, "meta": "[1, 2]"},
        "no_teacher": {**good, "teacher": None},
        "empty_model": {**good, "teacher": {**t, "model": ""}},
        "no_image": {**good, "image": None},
        "image_climbs_out": {**good, "image": {"bytes": None, "path": "../../etc/passwd"}},
        "image_absolute": {**good, "image": {"bytes": good["image"]["bytes"], "path": "/etc/passwd"}},
        "caption_with_question": {**good, "question": "Why?"},
        "blank_caption": {**good, "caption": "   "},
        "qa_without_answer": {**good, "kind": "qa", "caption": None, "question": "What is it?", "answer": None},
        "no_parent": {**good, "parent_id": ""},
        "null_source": {**good, "source": None},
        "no_key": {**good, "key": ""},
        "no_template_hash": {**good, "template": {"name": "x", "hash": ""}},
    }


def _write_with_bad_rows(ws: Workspace) -> tuple[list[dict], dict[str, dict]]:
    good = [to_row(caption(f"g{i}", unique_sentence(5000 + i), noise_image(600 + i))) for i in range(6)]
    bad = _bad_rows(good[0])
    for k, (name, row) in enumerate(bad.items()):  # distinct ids/keys so only the rule under test fails
        row["id"] = f"bad-{name}"
        if row.get("key"):
            row["key"] = f"bad/{name}"
    rows = good[:3] + list(bad.values()) + good[3:]
    table = pa.Table.from_pylist(rows, schema=schema_for("SynthRecord"))  # built with pyarrow, no validation
    with ShardWriter(ws.synthetic, "SynthRecord") as w:
        w.write_table(table)
    return good, bad


def test_record_problems_agrees_with_the_record_model(tmp_path):
    from cocoa.curation.rules.validity import record_problems

    ws = Workspace(tmp_path / "ws")
    good, bad = _write_with_bad_rows(ws)
    ds = open_dataset(ws.synthetic)
    problems = record_problems(ds).to_list()
    rows = ds.table().to_pylist()
    for i, row in enumerate(rows):
        try:
            from_row("SynthRecord", row)
            model_ok = True
        except RecordError:
            model_ok = False
        assert model_ok == (problems[i] is None), (row["id"], problems[i])
    assert sum(p is not None for p in problems) == len(bad)


def test_schema_invalid_rows_go_to_rejected_and_never_reach_mix(tmp_path):
    ws = _workspace(tmp_path / "ws")
    (ws.synthetic / MANIFEST).unlink()
    for f in ws.synthetic.glob("*.arrow"):
        f.unlink()
    good, bad = _write_with_bad_rows(ws)
    r = CliRunner().invoke(cli, ["curate", "--data", str(ws.root), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "invalid_record" in r.output
    curated = list(open_dataset(ws.curated))  # every curated row is a valid SynthRecord
    assert {c.id for c in curated} == {g["id"] for g in good}
    rejected = {q.record_id: q for q in open_dataset(ws.rejected)}
    for name in bad:
        q = rejected[f"bad-{name}"]
        assert q.reason == "invalid_record" and q.detail, name
    assert "kind 'summary' is not caption or qa" == rejected["bad-kind"].detail
    assert "meta is not valid JSON" in rejected["bad-meta_not_json"].detail
    assert "escapes its data root" in rejected["bad-image_climbs_out"].detail
    report = json.loads((ws.curated / "report.json").read_text())
    assert report["drops"]["invalid_record"]["count"] == len(bad)
    r = CliRunner().invoke(cli, ["mix", "--data", str(ws.root), "--no-progress"])
    assert r.exit_code == 0, r.output


# ---------------------------------------------------------------------------------------------
# item 5: inspect says "verified" only for what every reader accepts
# ---------------------------------------------------------------------------------------------
def test_inspect_refuses_what_a_reader_would_refuse(tmp_path):
    ws = Workspace(tmp_path / "ws")
    _write_with_bad_rows(ws)  # the first invalid row is row 3: past the 3 rows inspect prints
    r = CliRunner().invoke(cli, ["inspect", str(ws.synthetic)])
    assert r.exit_code == 1 and "verified" not in r.output
    assert "row 3" in r.output and "kind" in r.output

    good = tmp_path / "good"
    write_records(good, "PairRecord", [pair("s", qry_text=f"q{i}", pos_text=f"p{i}") for i in range(5)])
    r = CliRunner().invoke(cli, ["inspect", str(good)])
    assert r.exit_code == 0 and "verified: sha256 of 1 shards, 5 records valid PairRecords" in r.output
    r = CliRunner().invoke(cli, ["inspect", str(good), "--no-verify"])
    assert r.exit_code == 0 and "not verified" in r.output

    m = json.loads((good / MANIFEST).read_text())
    m["num_rows"] = 9
    m["shards"][0]["num_rows"] = 9
    (good / MANIFEST).write_text(json.dumps(m))
    for flags in ([], ["--no-verify"]):
        r = CliRunner().invoke(cli, ["inspect", str(good), *flags])
        assert r.exit_code == 1 and "verified" not in r.output and "9" in r.output


# ---------------------------------------------------------------------------------------------
# item 16: --eval-data takes MMEB-eval in its published layout
# ---------------------------------------------------------------------------------------------
def test_curate_decontaminates_against_an_mmeb_eval_directory(tmp_path):
    from cocoa.sources.mmeb import iter_mmeb_eval
    from cocoa.testing.mmeb import write_mmeb_eval_fixture

    ev = write_mmeb_eval_fixture(tmp_path / "MMEB-eval", datasets=("MSCOCO_t2i", "OK-VQA"), n_per_dataset=3,
                                 n_candidates=4)
    recs = list(iter_mmeb_eval(ev))
    long_text = next(t for r in recs for t in [r.qry_text, *r.tgt_texts] if t and len(t.split()) >= 10
                     and "<|image_1|>" not in t)
    eval_img = next(r.qry_image or r.tgt_images[0] for r in recs if (r.qry_image or r.tgt_images[0]) is not None)
    ws = _workspace(tmp_path / "ws")
    extra = [caption("leak-text", long_text, noise_image(990)),
             caption("leak-image", unique_sentence(6000), eval_img.model_copy(update={"path": None}))]
    write_records(ws.synthetic, "SynthRecord", list(open_dataset(ws.synthetic)) + extra, overwrite=True)
    write_records(ws.original, "PairRecord", list(open_dataset(ws.original))
                  + [pair("ret", qry_text="leaked", pos_image=eval_img.model_copy(update={"path": None}))],
                  overwrite=True)
    r = _in_process("curate", "--data", str(ws.root), "--eval-data", str(ev), "--no-progress")
    assert r.returncode == 0, r.stderr
    rej = {q.record_id: q for q in open_dataset(ws.rejected)}
    assert rej[extra[0].id].reason == "decontam_text" and rej[extra[1].id].reason == "decontam_image"
    assert any(q.meta.get("input") == "original" and q.reason == "decontam_image" for q in rej.values())
    rep = json.loads((ws.curated / "report.json").read_text())
    assert "MMEB-eval: MSCOCO_t2i, OK-VQA" in rep["decontamination"]["eval_index"]["datasets"][0]
    assert rep["decontamination"]["eval_index"]["images"] > 0


def test_eval_data_that_holds_nothing_usable_says_what_it_accepts(tmp_path):
    (tmp_path / "empty").mkdir()
    ws = _workspace(tmp_path / "ws", n=2)
    r = _in_process("curate", "--data", str(ws.root), "--eval-data", str(tmp_path / "empty"), "--no-progress")
    assert "MMEB-eval" in _one_line_error(r)


# ---------------------------------------------------------------------------------------------
# item 20: an empty synth run, empty curation, ratios with a zero side
# ---------------------------------------------------------------------------------------------
def test_curate_says_how_many_teacher_outputs_were_quarantined_and_why(tmp_path):
    ws = Workspace(tmp_path / "ws")
    write_records(ws.synthetic, "SynthRecord", [])
    q = [QuarantineRecord(stage="synth", reason=r, key=f"k{i}", raw="x") for i, r in
         enumerate(["invalid_json"] * 5 + ["too_short"] * 2 + ["refusal"])]
    write_records(ws.quarantine, "QuarantineRecord", q)
    r = _in_process("curate", "--data", str(ws.root), "--no-progress")
    msg = _one_line_error(r)
    assert "8 rows quarantined" in msg and "invalid_json 5, too_short 2, refusal 1" in msg
    assert "--ratio 1:0" in msg and "run `cocoa-data synth` first" not in msg


def test_mix_original_only_and_synthetic_only_when_explicit(tmp_path):
    ws = _workspace(tmp_path / "ws")  # no curated/: 1:0 needs none
    r = _in_process("mix", "--data", str(ws.root), "--ratio", "1:1", "--no-progress")
    msg = _one_line_error(r)
    assert "cocoa-data curate" in msg and "--ratio 1:0" in msg and "Create it first (`cocoa-data synth`)" not in msg
    r = _in_process("mix", "--data", str(ws.root), "--ratio", "1:0", "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = list(open_dataset(ws.mix))
    assert len(rows) == 16 and {m.origin for m in rows} == {"original"}
    card = json.loads((ws.mix / "mix_report.json").read_text())
    assert card["ratio_achieved"] == "1:0" and set(card["inputs"]) == {"original"}

    assert _in_process("curate", "--data", str(ws.root), "--no-progress").returncode == 0
    import shutil

    shutil.rmtree(ws.original)
    r = _in_process("mix", "--data", str(ws.root), "--ratio", "0:1", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert {m.origin for m in open_dataset(ws.mix)} == {"synthetic"} and len(open_dataset(ws.mix)) == 16

    r = _in_process("mix", "--data", str(ws.root), "--ratio", "0:0", "--no-progress")
    assert r.returncode == 2 and "neither side" in r.stderr


def test_mix_says_why_curated_is_empty(tmp_path):
    ws = _workspace(tmp_path / "ws", n=2)
    refusals = [caption(f"r{i}", f"I'm sorry, I cannot describe image number {i} for you.", noise_image(i))
                for i in range(3)]
    write_records(ws.synthetic, "SynthRecord", refusals, overwrite=True)
    assert _in_process("curate", "--data", str(ws.root), "--no-progress").returncode == 0
    r = _in_process("mix", "--data", str(ws.root), "--no-progress")
    msg = _one_line_error(r)
    assert "curate kept 0 of the 3 synthetic rows (top rules: refusal 3" in msg and "--ratio 1:0" in msg


# ---------------------------------------------------------------------------------------------
# item 23: every module the data and curation docs name exists
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("doc", ["docs/data.md", "docs/curation.md"])
def test_python_names_in_docs_resolve(doc):
    text = (ROOT / doc).read_text(encoding="utf-8")
    names = sorted(set(re.findall(r"`(cocoa(?:\.[A-Za-z_][A-Za-z0-9_]*)+)", text)))
    assert names
    for name in names:
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ModuleNotFoundError:
                continue
            for attr in parts[cut:]:
                assert hasattr(obj, attr), f"{doc}: `{name}` does not exist"
                obj = getattr(obj, attr)
            break
        else:
            pytest.fail(f"{doc}: `{name}` names no module")


def test_mix_names_an_invalid_original_row_and_the_fix(tmp_path):
    ws = _workspace(tmp_path / "ws", n=2)
    rows = [to_row(p) for p in open_dataset(ws.original)]
    rows.insert(2, {**rows[0], "id": "broken", "pos_text": "", "pos_image": None, "qry_image": None})  # empty pair
    table = pa.Table.from_pylist(rows, schema=schema_for("PairRecord"))
    with ShardWriter(ws.original, "PairRecord", mode="overwrite") as w:
        w.write_table(table)
    assert _in_process("curate", "--data", str(ws.root), "--no-progress").returncode == 0
    r = _in_process("mix", "--data", str(ws.root), "--no-progress")
    msg = _one_line_error(r)
    assert "row 2" in msg and "invalid PairRecord" in msg and "regenerate it" in msg and "--ratio 0:1" in msg


def test_curate_and_mix_wait_for_a_running_synth_worker(tmp_path):
    from cocoa.fs import exclusive_lock

    ws = _workspace(tmp_path / "ws", n=2)
    with exclusive_lock(ws.root, name=".cocoa-synth-part-00001-of-00002.lock"):  # as a synth worker holds it
        for cmd in ("curate", "mix"):
            msg = _one_line_error(_in_process(cmd, "--data", str(ws.root), "--no-progress"))
            assert "`cocoa-data synth` is writing" in msg and "part-00001-of-00002" in msg
    assert _in_process("curate", "--data", str(ws.root), "--no-progress").returncode == 0  # released: runs


# --- audit A fixes (B2, B3, C11-C14, D19, D20) -------------------------------------------------------------------
def _err(r: _Result) -> str:
    assert r.returncode != 0 and "Traceback" not in r.stdout, r.stdout
    return r.stdout


def test_mix_refuses_a_curated_not_made_from_the_current_inputs(tmp_path):
    ws = _workspace(tmp_path / "ws", n=3)
    assert _in_process("curate", "--data", str(ws.root), "--no-progress").returncode == 0
    assert _in_process("mix", "--data", str(ws.root), "--no-progress").returncode == 0
    write_records(ws.synthetic, "SynthRecord", [caption("z", unique_sentence(9000), noise_image(5))], overwrite=True)
    out = _err(_in_process("mix", "--data", str(ws.root), "--no-progress"))
    assert "not made from the current" in out and "rerun `cocoa-data curate" in out
    assert _in_process("mix", "--data", str(ws.root), "--ratio", "0:1", "--no-progress").returncode != 0
    assert _in_process("curate", "--data", str(ws.root), "--no-progress").returncode == 0
    write_records(ws.original, "PairRecord", [pair("vqa", qry_text="q?", qry_image=noise_image(1), pos_text="a b")],
                  overwrite=True)
    assert "rerun `cocoa-data curate" in _err(_in_process("mix", "--data", str(ws.root), "--ratio", "1:0",
                                                          "--no-progress"))


def test_unusable_eval_data_warns_or_fails(tmp_path):
    from cocoa.records import EvalRecord, ImageRef

    ws = _workspace(tmp_path / "ws", n=3)
    ev = tmp_path / "ev"
    recs = [EvalRecord(dataset="D", id=f"e{i}", meta_task="retrieval", split="IND", qry_text="x", qry_image=ImageRef(path=f"gone{i}.png"),
                       tgt_texts=["y"], tgt_images=[None]) for i in range(3)]
    write_records(ev / "D", "EvalRecord", recs)
    out = _err(_in_process("curate", "--data", str(ws.root), "--eval-data", str(ev), "--no-progress"))
    assert "yields nothing to decontaminate against" in out and "image missing 3" in out
    long = " ".join(f"w{i}" for i in range(12))
    write_records(ev / "D", "EvalRecord", recs + [EvalRecord(dataset="D", id="t", meta_task="retrieval", split="IND", qry_text=long, tgt_texts=["y"],
                                                             tgt_images=[None])], overwrite=True)
    r = _in_process("curate", "--data", str(ws.root), "--eval-data", str(ev), "--no-progress")
    assert r.returncode == 0 and "warning: decontamination is incomplete: 3 eval images/rows" in r.stdout
    (tmp_path / "f.sh").write_text("x")
    out = _err(_in_process("curate", "--data", str(ws.root), "--eval-data", str(tmp_path / "f.sh")))
    assert "is a file, not a directory" in out


@pytest.mark.parametrize("args,needle", [
    (["--near-seed", "-1"], "near.seed"), (["--near-seed", str(2**70)], "near.seed"),
    (["--near-num-perm", "100000000"], "near.num_perm"), (["--exact-global-kinds", "foo"], "'caption', 'qa'"),
    (["--near-kinds", ""], "--no-near-enabled"), (["--image-max-pixels", str(10**12)], "image.max_pixels"),
    (["--text-caption-min-words", "10", "--text-caption-max-words", "2"], "--text-caption-min-words (10)"),
])
def test_curate_refuses_bad_settings_before_work(tmp_path, args, needle):
    ws = _workspace(tmp_path / "ws", n=1)
    out = _err(_in_process("curate", "--data", str(ws.root), *args))
    assert needle in out and not ws.curated.exists()


def test_yaml_bool_for_a_count_and_tiny_ratio_are_refused(tmp_path):
    from cocoa.config import ConfigError
    from cocoa.cli.data_scenes import ScenesConfig
    from cocoa.curation.config import CurationConfig
    from cocoa.curation.mix import RatioError, parse_ratio

    for cls, data in ((ScenesConfig, {"train": True}), (CurationConfig, {"near": {"shingle": True}})):
        with pytest.raises(ConfigError, match="whole number"):
            cls.build(data)
    with pytest.raises(RatioError, match="rounds to 0"):
        parse_ratio("1e-400:1")
    assert parse_ratio("0:1") == (0.0, 1.0)


@pytest.mark.parametrize("args,needle", [
    (["--image-size", "100000"], "image_size"), (["--out", ""], "--out is empty"),
    (["--contact-sheet", "."], "is a directory"),
])
def test_scenes_refuses_bad_flags_before_building(tmp_path, args, needle):
    out = _err(_in_process("scenes", "--out", str(tmp_path / "s"), "--train", "2", "--eval-per-task", "1",
                           "--distractors", "1", *args))
    assert needle in out and not (tmp_path / "s").exists()


def test_a_decompression_bomb_is_too_large_not_unreadable():
    import io

    from PIL import Image

    from cocoa.curation.images import analyse_image

    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")  # 400 Mpixel: PIL refuses it as a bomb
    info = analyse_image(buf.getvalue(), 40_000_000)
    assert info.ok and (info.width, info.height) == (20000, 20000)
