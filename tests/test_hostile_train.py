"""Hostile inputs and faults for `cocoa-train` (issue 12: items 3, 4, 5, 8, 9, 14, 21, 25).

Real files, real subprocesses, the real tiny model: --overwrite never deletes what cocoa did not make, one
writer per run directory, tampered shards are refused, a bad image names its row (or is skipped and
counted), a too-large tokenizer is named, truncation is counted, a batch too large names its stage, a rerun
names the settings that differ, and progress in a pipe is plain lines without library bars."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from train_support import make_workspace, subprocess_env

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ws(scenes_root, tmp_path_factory):
    return make_workspace(scenes_root, tmp_path_factory.mktemp("hostile-train-ws"))




def _pairs(scenes_root: Path, n: int) -> list:
    """The first ``n`` scenes pairs, with their images embedded (as an MMEB import stores them)."""
    from cocoa.records import ImageRef
    from cocoa.shards import open_dataset

    root = scenes_root / "original"
    out = []
    for p in open_dataset(root):
        if len(out) == n:
            break
        upd = {f: ImageRef(bytes=getattr(p, f).read_bytes(root)) for f in ("qry_image", "pos_image", "neg_image")
               if getattr(p, f) is not None}
        out.append(p.model_copy(update=upd))
    return out


def _write_pairs(dest: Path, recs: list) -> Path:
    from cocoa.shards import write_records

    write_records(dest / "original", "PairRecord", recs, overwrite=True)
    return dest


def _s3_args(data: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["--stages", "3", "--data", str(data), "--model", str(model), "--out", str(out), "--preset", "tiny",
            "--stage3-steps", "2", "--stage3-batch-size", "8", "--stage3-micro-batch-size", "8", "--no-progress",
            *extra]


def _invoke(args: list[str]):
    from cocoa.cli.train import cli

    return CliRunner().invoke(cli, args)


def _one_clean_line(r) -> None:
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and "IndexError" not in r.output, r.output


# ---------------------------------------------------------------------------------------------------
# item 3: --overwrite deletes only a cocoa run (or an empty directory)
# ---------------------------------------------------------------------------------------------------
def test_overwrite_refuses_a_foreign_directory_and_the_working_directory(ws, tiny_model_dir, tmp_path, monkeypatch):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    r = _invoke(_s3_args(ws, tiny_model_dir, foreign, "--overwrite"))
    _one_clean_line(r)
    assert "not a cocoa-train run directory" in r.output, r.output
    assert (foreign / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]  # not even a lock file left in it
    # without --overwrite it is not written into either
    r = _invoke(_s3_args(ws, tiny_model_dir, foreign))
    _one_clean_line(r)
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]
    # `--out . --overwrite` inside a cocoa run directory: the working directory is never deleted
    run = tmp_path / "run"
    from cocoa.fs import mark_owned

    mark_owned(run, "run")
    (run / "metrics.jsonl").write_text("")
    monkeypatch.chdir(run)
    r = _invoke(_s3_args(ws, tiny_model_dir, Path("."), "--overwrite"))
    _one_clean_line(r)
    assert "working directory" in r.output, r.output
    assert (run / "metrics.jsonl").exists()


def test_overwrite_empties_a_cocoa_run_and_keeps_it_marked(tmp_path):
    from cocoa.fs import MARKER, is_owned, mark_owned
    from cocoa.train.config import TrainConfig
    from cocoa.train.run_dir import prepare_run_dir

    out = tmp_path / "run"
    mark_owned(out, "run")
    (out / "stage1").mkdir()
    (out / "stage1" / "junk.bin").write_bytes(b"x")
    cfg = TrainConfig.build({"out": str(out), "overwrite": True})
    prepare_run_dir(cfg, True)
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "config.yaml"]) and is_owned(out)
    # a run made before the marker existed (cocoa-train's config.yaml, no marker) may still be overwritten
    legacy = tmp_path / "legacy"
    (legacy / "stage3").mkdir(parents=True)
    (legacy / "config.yaml").write_text(TrainConfig.build({"out": str(legacy)}).to_yaml())
    from cocoa.train.run_dir import check_out_dir

    cfg = TrainConfig.build({"out": str(legacy), "overwrite": True})
    check_out_dir(cfg)
    prepare_run_dir(cfg, True)
    assert not (legacy / "stage3").exists() and is_owned(legacy)
    # a fresh run directory is marked as cocoa's, so a later --overwrite may replace it
    fresh = tmp_path / "fresh"
    prepare_run_dir(TrainConfig.build({"out": str(fresh)}), True)
    assert json.loads((fresh / MARKER).read_text())["kind"] == "run"


def test_tiny_model_overwrite_refuses_foreign_files(tmp_path, monkeypatch):
    from cocoa.cli.train import cli

    d = tmp_path / "models"
    d.mkdir()
    (d / "notes.txt").write_text("keep")
    for cmd in (["tiny-model", "--out", str(d), "--overwrite"], ["pretrain-tiny", "--out", str(d), "--overwrite"]):
        r = CliRunner().invoke(cli, cmd)
        assert r.exit_code == 1 and "not made by cocoa" in r.output, r.output
        assert (d / "notes.txt").read_text() == "keep"
    monkeypatch.chdir(d)
    r = CliRunner().invoke(cli, ["tiny-model", "--out", ".", "--overwrite"])
    assert r.exit_code == 1 and (d / "notes.txt").exists(), r.output


# ---------------------------------------------------------------------------------------------------
# item 4: one writer per run directory (two real cocoa-train processes)
# ---------------------------------------------------------------------------------------------------
def test_second_cocoa_train_on_the_same_out_fails_at_once(ws, tiny_model_dir, tmp_path):
    from cocoa.fs import is_locked

    out = tmp_path / "run"
    args = _s3_args(ws, tiny_model_dir, out)
    args[args.index("--stage3-steps") + 1] = "100000"
    env = subprocess_env()
    first = subprocess.Popen([str(BIN / "cocoa-train"), *args], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not is_locked(out):
            assert first.poll() is None, first.stderr.read()
            assert time.time() < deadline, "the first run never took its lock"
            time.sleep(0.1)
        t0 = time.time()
        second = subprocess.run([str(BIN / "cocoa-train"), *args], env=env, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 1, second.stderr
        assert "in use by another cocoa process" in second.stderr and f"pid {first.pid}" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
        assert time.time() - t0 < 60
        assert first.poll() is None  # the first run is untouched
    finally:
        first.kill()
        first.wait()
    # the kernel released the lock with the killed process: a new run may take the directory
    assert not is_locked(out)


# ---------------------------------------------------------------------------------------------------
# item 5: tampered shards are refused before any compute
# ---------------------------------------------------------------------------------------------------
def _copy_original(scenes_root: Path, dest: Path) -> Path:
    shutil.copytree(scenes_root / "original", dest / "original", symlinks=False)
    return dest


def _shard(d: Path) -> Path:
    m = json.loads((d / "original" / "manifest.json").read_text())
    return d / "original" / m["shards"][0]["file"]


def test_flipped_byte_in_a_shard_is_refused(scenes_root, tiny_model_dir, tmp_path):
    d = _copy_original(scenes_root, tmp_path / "ws")
    f = _shard(d)
    b = bytearray(f.read_bytes())
    i = b.find(b"a photo with")  # inside a text value: the Arrow file stays readable, only the text changes
    assert i > 0
    b[i] ^= 0x01
    f.write_bytes(bytes(b))
    r = _invoke(_s3_args(d, tiny_model_dir, tmp_path / "run"))
    _one_clean_line(r)
    assert "sha256" in r.output and f.name in r.output, r.output
    assert not (tmp_path / "run" / "stage3").exists()


def test_edited_num_rows_is_one_clear_line(scenes_root, tiny_model_dir, tmp_path):
    d = _copy_original(scenes_root, tmp_path / "ws")
    mf = d / "original" / "manifest.json"
    m = json.loads(mf.read_text())
    m["shards"][0]["num_rows"] += 7
    m["num_rows"] += 7
    mf.write_text(json.dumps(m))
    r = _invoke(_s3_args(d, tiny_model_dir, tmp_path / "run"))
    _one_clean_line(r)
    assert "rows" in r.output and "manifest" in r.output, r.output


# ---------------------------------------------------------------------------------------------------
# item 8: a bad image names dataset, row, record and field; --on-bad-row skip counts it
# ---------------------------------------------------------------------------------------------------
def test_bad_image_is_named_or_skipped_and_counted(scenes_root, tiny_model_dir, tmp_path, one_thread):
    from cocoa.records import ImageRef

    recs = _pairs(scenes_root, 15)
    bad = recs[3].model_copy(update={"qry_image": ImageRef(bytes=b"\x89PNG\r\n\x1a\n this is not an image")})
    recs[3] = bad
    d = _write_pairs(tmp_path / "ws", recs)
    # raised inside a DataLoader worker, it still arrives as one line (not re-wrapped with a worker traceback)
    r = _invoke(_s3_args(d, tiny_model_dir, tmp_path / "run", "--num-workers", "1"))
    _one_clean_line(r)
    assert "DataLoader worker" not in r.output, r.output
    out = " ".join(r.output.split())
    assert "cannot be decoded" in out and "row 3" in out and bad.id in out and "qry_image" in out, out
    assert "original" in out and "--on-bad-row skip" in out, out
    # skip: the run finishes; every skipped row is counted in metrics.jsonl and the stage summary
    run = tmp_path / "run2"
    r = _invoke(_s3_args(d, tiny_model_dir, run, "--on-bad-row", "skip", "--stage3-steps", "4"))
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "stage3" / "summary.json").read_text())
    assert summary["skipped_bad_rows"] == sum(x["skipped"] for x in rows) >= 1, (summary, rows)
    assert "bad rows skipped" in r.output and bad.id in r.output, r.output


# ---------------------------------------------------------------------------------------------------
# item 9: a tokenizer larger than the embedding table
# ---------------------------------------------------------------------------------------------------
def test_tokenizer_larger_than_the_embedding_table_is_named(ws, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from cocoa.model.embedder import Embedder
    from cocoa.model.wrapper import VocabMismatchError

    m = tmp_path / "model"
    shutil.copytree(tiny_model_dir, m)
    tok = AutoTokenizer.from_pretrained(m)
    rows = json.loads((m / "config.json").read_text())
    n_rows = (rows.get("text_config") or rows)["vocab_size"]
    added = tok.add_tokens(["circle", "square", "red", "blue", "green", "triangle"] + [f"w{i}" for i in range(40)])
    tok.save_pretrained(m)
    assert len(tok) > n_rows, (len(tok), n_rows)
    with pytest.raises(VocabMismatchError, match=rf"{len(tok)} tokens .* {n_rows} rows"):
        Embedder.from_pretrained(m, device="cpu")
    r = _invoke(_s3_args(ws, m, tmp_path / "run"))
    _one_clean_line(r)
    assert f"{len(tok)} tokens" in r.output and f"{n_rows} rows" in r.output, (added, r.output)


# ---------------------------------------------------------------------------------------------------
# item 14: truncation is counted, logged, recorded and warned about
# ---------------------------------------------------------------------------------------------------
def test_truncated_samples_are_counted_and_warned(scenes_root, tiny_model_dir, tmp_path, one_thread):
    recs = _pairs(scenes_root, 10)
    d = _write_pairs(tmp_path / "ws", recs)
    run = tmp_path / "run"
    spec = json.loads((Path(tiny_model_dir) / "cocoa.json").read_text())
    # the smallest length check_model allows for one image: every query with text is cut to a token or two
    from math import ceil

    short = ceil(spec["image_max_pixels"] / 28 ** 2) + 3 + 1
    r = _invoke(_s3_args(d, tiny_model_dir, run, "--stage3-max-length", str(short)))
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "stage3" / "summary.json").read_text())
    assert summary["truncated"] == sum(x["truncated"] for x in rows) > 0, (summary, rows)
    assert summary["samples"] >= 2 * 8 * 2 and summary["truncated_share"] > 0.05
    text = " ".join(r.output.split())
    assert "warning:" in text and f"--stage3-max-length {short}" in text and "were cut" in text, text


# ---------------------------------------------------------------------------------------------------
# item 21: a batch too large names its stage; a rerun names the differing settings of started stages
# ---------------------------------------------------------------------------------------------------
def test_preset_tiny_on_47_pairs_names_the_stage_and_the_value(scenes_root, tiny_model_dir, tmp_path):
    d = _write_pairs(tmp_path / "ws", _pairs(scenes_root, 47))
    from cocoa.cli.train import cli

    r = CliRunner().invoke(cli, ["--stages", "3", "--data", str(d), "--model", str(tiny_model_dir), "--preset",
                                 "tiny", "--out", str(tmp_path / "run")])
    _one_clean_line(r)
    text = " ".join(r.output.split())
    assert "stage 3:" in text and "47 rows" in text and "global batch of 64" in text, text
    assert "--stage3-batch-size" in text and "at most 47" in text, text
    assert not (tmp_path / "run").exists()  # refused before anything was created


def test_rerun_names_differing_settings_and_allows_changing_unstarted_stages(tmp_path):
    from cocoa.train.config import TrainConfig, resolve_preset
    from cocoa.train.preflight import TrainError
    from cocoa.train.run_dir import prepare_run_dir

    out = tmp_path / "run"
    base = {"out": str(out), "preset": "tiny", "stages": "1,2,3"}
    prepare_run_dir(resolve_preset(TrainConfig.build(base)), True)
    (out / "stage1" / "checkpoints" / "step-00000050").mkdir(parents=True)  # stage 1 started (and only it)
    # a setting of stage 3 (not started) may change: the rerun goes on with the new value
    changed = resolve_preset(TrainConfig.build({**base, "stage3": {"batch_size": 32}}))
    prepare_run_dir(changed, True)
    assert TrainConfig.from_yaml(out / "config.yaml").stage3.batch_size == 32
    # display / bookkeeping settings never matter
    prepare_run_dir(resolve_preset(TrainConfig.build({**base, "stage3": {"batch_size": 32}, "log_every": 5,
                                                       "on_bad_row": "skip"})), True)
    # a setting of stage 1 (started) or a run-wide one may not, and the message names each
    bad = resolve_preset(TrainConfig.build({**base, "stage3": {"batch_size": 32}, "stage1": {"lr": 0.01}, "seed": 3}))
    with pytest.raises(TrainError) as e:
        prepare_run_dir(bad, True)
    msg = str(e.value)
    assert "--stage1-lr was 0.0001, now 0.01" in msg and "--seed was 0, now 3" in msg, msg
    assert "stage 1 (already started)" in msg and "stage3" not in msg, msg


# ---------------------------------------------------------------------------------------------------
# item 25: progress through a pipe -- plain lines with rate and ETA, no rich bar, no library bars
# ---------------------------------------------------------------------------------------------------
def test_progress_in_a_pipe_is_plain_lines_without_library_bars(ws, tiny_model_dir, tmp_path):
    args = _s3_args(ws, tiny_model_dir, tmp_path / "run", "--stage3-steps", "3")
    args.remove("--no-progress")
    env = dict(subprocess_env(), COCOA_PROGRESS_INTERVAL="0", COLUMNS="80")
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    env.pop("COCOA_PROGRESS", None)
    p = subprocess.run(f"{BIN / 'cocoa-train'} {' '.join(args)} 2>&1 | cat", shell=True, env=env,
                       capture_output=True, text=True, timeout=300)
    out = p.stdout
    assert p.returncode == 0, out
    lines = [x for x in out.splitlines() if x.startswith("stage 3: ") and "/3 (" in x]
    assert [x.split()[2] for x in lines] == ["1/3", "2/3", "3/3"], out
    assert all(re.search(r"loss \d+\.\d+ .*\| [\d.]+ steps/s, elapsed \d:\d\d:\d\d, ETA \d:\d\d:\d\d$", x)
               for x in lines), lines
    assert "━" not in out and "…" not in out, out  # no (truncated) rich bar
    assert "Loading weights" not in out and "Writing model shards" not in out and "it/s]" not in out, out


def test_plain_progress_prints_whole_lines_at_the_interval_and_at_the_end(tmp_path, monkeypatch):
    from rich.console import Console

    from cocoa.progress import PlainProgress, Progress, mode

    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        con = Console(file=f)
        monkeypatch.delenv("COCOA_PROGRESS", raising=False)
        assert mode(con) == "plain"  # a file is not a terminal
        with Progress(console=con, unit="steps", interval=3600) as p:
            assert isinstance(p, PlainProgress)
            t = p.add_task("stage 2", total=500, info="")
            for i in range(1, 501):
                p.update(t, completed=i, info=f"loss {1 / i:.4f}  a long field " + "x" * 150)
    lines = log.read_text().splitlines()
    # one line (the interval is an hour): the final one, whole (no 80-column cut), with rate and ETA
    assert len(lines) == 1 and lines[0].startswith("stage 2: 500/500 (100%) loss 0.0020  a long field " + "x" * 150)
    assert re.search(r"\| [\d.,]+ steps/s, elapsed 0:00:\d\d, ETA 0:00:00$", lines[0]), lines
    monkeypatch.setenv("COCOA_PROGRESS", "off")
    with Progress(console=Console(file=open(os.devnull, "w"))) as p:
        p.update(p.add_task("x", total=1), completed=1)
    assert p.disable


def test_unknown_lora_target_modules_is_one_line(ws, tiny_model_dir, tmp_path):
    r = _invoke(_s3_args(ws, tiny_model_dir, tmp_path / "run", "--lora-method", "lora",
                         "--lora-target-modules", "no_such_proj"))
    _one_clean_line(r)
    assert "--lora-target-modules no_such_proj" in r.output and "q_proj" in r.output, r.output


# ---------------------------------------------------------------------------------------------------
# audit B (train): foreign config.yaml, moved runs, damaged / edited / foreign checkpoints, divergence,
# damaged model directories, absurd numbers
# ---------------------------------------------------------------------------------------------------
def test_a_users_dir_with_any_config_yaml_is_never_overwritten_or_written_into(tmp_path):
    from cocoa.train.config import TrainConfig
    from cocoa.train.preflight import TrainError
    from cocoa.train.run_dir import check_out_dir, prepare_run_dir

    for text in ("", "seed: 1\n", "stages: '3'\n", "# my notes\n"):
        proj = tmp_path / f"proj{len(text)}"
        (proj / "src").mkdir(parents=True)
        (proj / "src" / "notes.py").write_text("precious")
        (proj / "config.yaml").write_text(text)
        for overwrite in (True, False):
            cfg = TrainConfig.build({"out": str(proj), "overwrite": overwrite})
            with pytest.raises(TrainError, match="not a cocoa-train run directory"):
                check_out_dir(cfg)
            with pytest.raises(TrainError, match="not a cocoa-train run directory"):
                prepare_run_dir(cfg, True)
        assert (proj / "src" / "notes.py").read_text() == "precious" and (proj / "config.yaml").read_text() == text
    # a full cocoa-train config.yaml next to a user's own file is not a run either
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "config.yaml").write_text(TrainConfig.build({"out": str(mixed)}).to_yaml())
    (mixed / "thesis.tex").write_text("keep")
    with pytest.raises(TrainError):
        check_out_dir(TrainConfig.build({"out": str(mixed), "overwrite": True}))
    assert (mixed / "thesis.tex").exists()


def test_a_moved_run_continues_under_its_new_out(tmp_path):
    from cocoa.train.config import TrainConfig, resolve_preset
    from cocoa.train.run_dir import prepare_run_dir

    out = tmp_path / "run"
    prepare_run_dir(resolve_preset(TrainConfig.build({"out": str(out), "preset": "tiny"})), True)
    (out / "stage1" / "checkpoints" / "step-00000002").mkdir(parents=True)
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    prepare_run_dir(resolve_preset(TrainConfig.build({"out": str(moved), "preset": "tiny"})), True)


@pytest.fixture(scope="module")
def ckpt_run(ws, tiny_model_dir, tmp_path_factory):
    """A stage-3 run of 4 steps with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("ckpt-run") / "run"
    r = _invoke(_s3_args(ws, tiny_model_dir, out, "--stage3-steps", "4", "--stage3-save-every", "2"))
    assert r.exit_code == 0, r.output
    return out


def _interrupted_copy(run: Path, dest: Path) -> Path:
    """``run`` as if killed after its step-2 checkpoint."""
    shutil.copytree(run, dest)
    for p in ("model", "summary.json", "loss.png", "checkpoints/step-00000004"):
        q = dest / "stage3" / p
        shutil.rmtree(q) if q.is_dir() else q.unlink(missing_ok=True)
    return dest


def test_edited_or_damaged_checkpoint_is_one_line_naming_the_file(ckpt_run, ws, tiny_model_dir, tmp_path,
                                                                    one_thread):
    cases = {
        "step 99": ("state.json", lambda f: f.write_text(f.read_text().replace('"step": 2', '"step": 99')), "outside 1..4"),
        "step -3": ("state.json", lambda f: f.write_text(f.read_text().replace('"step": 2', '"step": -3')), "outside 1..4"),
        "step 4": ("state.json", lambda f: f.write_text(f.read_text().replace('"step": 2', '"step": 4')), "step-00000002"),
        "step two": ("state.json", lambda f: f.write_text(f.read_text().replace('"step": 2', '"step": "two"')), "'two'"),
        "cut state": ("state.json", lambda f: f.write_text('{"step": '), "not valid JSON"),
        "cut optimizer": ("optimizer.pt", lambda f: os.truncate(f, 100), "optimizer"),
        "cut weights": ("weights.safetensors", lambda f: os.truncate(f, 100), "weights"),
        "cut rng": ("rng-rank0.pt", lambda f: os.truncate(f, 10), "random state"),
        "cut scheduler": ("scheduler.pt", lambda f: os.truncate(f, 10), "scheduler"),
    }
    for i, (name, (fname, damage, words)) in enumerate(cases.items()):
        run = _interrupted_copy(ckpt_run, tmp_path / f"r{i}")
        f = run / "stage3" / "checkpoints" / "step-00000002" / fname
        damage(f)
        r = _invoke(_s3_args(ws, tiny_model_dir, run, "--stage3-steps", "4", "--stage3-save-every", "2"))
        _one_clean_line(r)
        text = " ".join(r.output.split())
        assert str(f) in text and "damaged" in text and words in text and "--overwrite" in text, (name, text)
        assert not (run / "stage3" / "model").exists(), name


def test_resume_from_another_runs_checkpoint_names_the_differing_settings(ckpt_run, ws, tiny_model_dir, tmp_path,
                                                                          one_thread):
    ck = ckpt_run / "stage3" / "checkpoints" / "step-00000002"
    r = _invoke(_s3_args(ws, tiny_model_dir, tmp_path / "rx", "--stage3-steps", "4", "--stage3-lr", "0.01",
                         "--seed", "5", "--resume", str(ck)))
    _one_clean_line(r)
    text = " ".join(r.output.split())
    assert "--stage3-lr was 0.0003, now 0.01" in text and "--seed was 0, now 5" in text, text
    assert not (tmp_path / "rx" / "stage3" / "model").exists()
    # with the same settings (another --out) it resumes
    r = _invoke(_s3_args(ws, tiny_model_dir, tmp_path / "ry", "--stage3-steps", "4", "--resume", str(ck)))
    assert r.exit_code == 0 and "at step 2" in r.output, r.output


def test_non_finite_settings_are_refused_and_a_diverging_loss_stops_without_saving(ws, tiny_model_dir, tmp_path,
                                                                                 monkeypatch, one_thread):
    for flags in (["--stage3-lr", "inf"], ["--stage3-lr", "1e30"], ["--stage3-weight-decay", "inf"],
                  ["--stage3-lr", "nan"]):
        r = _invoke(_s3_args(ws, tiny_model_dir, tmp_path / "bad", *flags))
        assert r.exit_code == 2 and "Traceback" not in r.output and "stage3." in r.output, (flags, r.output)
    y = tmp_path / "c.yaml"
    y.write_text("stage3: {lr: .inf}\n")
    r = _invoke(_s3_args(ws, tiny_model_dir, tmp_path / "bad", "--config", str(y)))
    assert r.exit_code == 2 and "finite" in r.output, r.output
    assert not (tmp_path / "bad").exists()
    import cocoa.train.method as M

    monkeypatch.setattr(M, "stage3_step", lambda *a, **k: (float("nan"), {}, 1, 1))
    r = _invoke(_s3_args(ws, tiny_model_dir, tmp_path / "nan"))
    _one_clean_line(r)
    assert "stage 3 step 1: training diverged (loss nan" in " ".join(r.output.split()), r.output
    assert not (tmp_path / "nan" / "stage3" / "model").exists()
    assert not (tmp_path / "nan" / "stage3" / "checkpoints").exists()


def test_damaged_model_directory_is_one_line_naming_it(ws, tiny_model_dir, tmp_path):
    from cocoa.errors import CocoaError
    from cocoa.model.wrapper import CocoaModel
    from cocoa.train.config import TrainConfig
    from cocoa.train.preflight import TrainError, check_model

    cfg = TrainConfig.build({"stages": "3"})

    def copy(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(tiny_model_dir, d)
        return d

    d = copy("list")
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(TrainError, match="holds a list"):
        check_model(str(d), cfg)
    d = copy("noweights")
    (d / "model.safetensors").unlink()
    with pytest.raises(TrainError, match="has no weights"):
        check_model(str(d), cfg)
    for size in (5, 100000):
        d = copy(f"cut{size}")
        os.truncate(d / "model.safetensors", size)
        with pytest.raises(CocoaError, match=f"model directory {d}: its weights file is damaged"):
            CocoaModel.from_pretrained(d)
    d = copy("mismatch")
    c = json.loads((d / "config.json").read_text())
    tc = c.get("text_config", c)
    tc["hidden_size"] = tc["hidden_size"] * 2
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(CocoaError, match=f"model directory {d}: its config.json does not match its weights"):
        CocoaModel.from_pretrained(d)
    r = _invoke(_s3_args(ws, tiny_model_dir, tmp_path / "run", "--model", str(tmp_path / "list")))
    _one_clean_line(r)


def test_huge_numbers_are_config_bounds_naming_the_setting(ws, tiny_model_dir, tmp_path):
    for flags, key in ((["--seed", "99999999999999999999"], "seed"),
                       (["--stage3-steps", "99999999999999999999"], "stage3.steps"),
                       (["--stage3-steps", "0", "--stage3-epochs", "inf"], "stage3.epochs")):
        r = _invoke(_s3_args(ws, tiny_model_dir, tmp_path / "run", *flags))
        assert r.exit_code == 2 and key in r.output and "Traceback" not in r.output, (flags, r.output)


def test_special_token_in_training_text_is_named_or_skipped(scenes_root, tiny_model_dir, tmp_path, one_thread):
    recs = _pairs(scenes_root, 15)
    bad = recs[2].model_copy(update={"pos_text": "a <|image_pad|> <|vision_start|> caption"})
    recs[2] = bad
    d = _write_pairs(tmp_path / "ws", recs)
    r = _invoke(_s3_args(d, tiny_model_dir, tmp_path / "run"))
    _one_clean_line(r)
    out = " ".join(r.output.split())
    assert bad.id in out and "pos_text" in out and "--on-bad-row skip" in out, out
    run = tmp_path / "run2"
    r = _invoke(_s3_args(d, tiny_model_dir, run, "--on-bad-row", "skip", "--stage3-steps", "4"))
    assert r.exit_code == 0, r.output
    assert json.loads((run / "stage3" / "summary.json").read_text())["skipped_bad_rows"] >= 1
