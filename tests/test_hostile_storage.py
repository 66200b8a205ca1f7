"""Hostile inputs against the ground floor: tampered manifests and shards, foreign files, non-UTF-8 text,
a full disk, locks and owned directories. Real files, real subprocesses, a real (tmpfs) full disk."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from cocoa.config import Config, ConfigError
from cocoa.fs import (
    LockedError,
    NotOwnedError,
    UnsafePathError,
    contained,
    exclusive_lock,
    mark_owned,
    remove_owned_tree,
)
from cocoa.records import schema_for
from cocoa.shards import MANIFEST, ShardError, ShardWriter, open_dataset, read_manifest, sha256_file, write_records

from test_shards import pairs

BIN = Path(sys.executable).parent


def _edit_manifest(ds: Path, fn) -> None:
    m = json.loads((ds / MANIFEST).read_text())
    fn(m)
    (ds / MANIFEST).write_text(json.dumps(m))


# ---------------------------------------------------------------------------------------------
# 2. manifest paths are never trusted
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_manifest_paths_outside_the_dataset_are_refused_and_never_deleted(tmp_path, how):
    outside = tmp_path / "precious"
    outside.mkdir()
    sentinel = outside / "shard-00000.arrow"
    ds = tmp_path / "ws" / "curated"
    write_records(ds, "PairRecord", pairs(3))
    shutil.copy(ds / "shard-00000.arrow", sentinel)  # a valid shard, so only the path is wrong
    if how == "absolute":
        rel = str(sentinel)
    elif how == "dotdot":
        rel = "../../precious/shard-00000.arrow"
    else:
        (ds / "shard-00099.arrow").symlink_to(sentinel)
        rel = "shard-00099.arrow"
    _edit_manifest(ds, lambda m: m["shards"].__setitem__(0, {**m["shards"][0], "file": rel}))

    with pytest.raises(UnsafePathError, match="only uses paths inside"):
        open_dataset(ds)
    with pytest.raises(UnsafePathError):
        ShardWriter(ds, "PairRecord", mode="overwrite")  # the writer that used to delete what was listed
    with pytest.raises(UnsafePathError):
        ShardWriter(ds, "PairRecord", mode="append")
    assert sentinel.is_file()


def test_overwrite_deletes_only_shards_cocoa_named(tmp_path):
    ds = tmp_path / "ds"
    write_records(ds, "PairRecord", pairs(3))
    notes = ds / "notes.txt"
    notes.write_text("mine")
    mine = ds / "mine.arrow"
    mine.write_bytes(b"user data")
    # a manifest edited to list the user's file inside the dataset: contained, but not a cocoa shard name
    _edit_manifest(ds, lambda m: m["shards"].append({"file": "notes.txt", "num_rows": 0, "bytes": 4, "sha256": "x"}))
    write_records(ds, "PairRecord", pairs(2), overwrite=True)
    assert notes.read_text() == "mine" and mine.read_bytes() == b"user data"
    assert len(list(open_dataset(ds))) == 2


def test_a_fresh_writer_never_deletes_files_it_did_not_write(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "shard-00000.arrow").write_bytes(b"someone else's file with cocoa's name")
    (d / ".shard-00001.arrow.tmp-1").write_bytes(b"x")
    write_records(d / "sub", "PairRecord", pairs(1))  # unrelated
    w = ShardWriter(d, "PairRecord", mode="create")
    w.close()
    assert (d / "shard-00000.arrow").read_bytes().startswith(b"someone")
    assert (d / ".shard-00001.arrow.tmp-1").exists()


def test_contained_rules(tmp_path):
    assert contained(tmp_path, "a/b.arrow", where="m") == tmp_path / "a/b.arrow"
    for bad in ["", "/etc/passwd", "a/../../x", "..", "a\\..\\x", "C:/x", "a\x00b"]:
        with pytest.raises(UnsafePathError):
            contained(tmp_path, bad, where="m")


# ---------------------------------------------------------------------------------------------
# 5. readers check what is cheap always, sha256 when verifying
# ---------------------------------------------------------------------------------------------
def test_edited_num_rows_is_refused_by_readers(tmp_path):
    ds = tmp_path / "ds"
    write_records(ds, "PairRecord", pairs(4))
    _edit_manifest(ds, lambda m: m.__setitem__("num_rows", 40))
    with pytest.raises(ShardError, match="says num_rows 40 but its shards hold 4"):
        open_dataset(ds, verify=False)

    def both(m):
        m["num_rows"] = 40
        m["shards"][0]["num_rows"] = 40

    _edit_manifest(ds, both)
    with pytest.raises(ShardError, match="holds 4 rows but the manifest says 40"):
        open_dataset(ds, verify=False)
    r = subprocess.run([BIN / "cocoa-data", "inspect", str(ds)], capture_output=True, text=True)
    assert r.returncode == 1 and "verified" not in r.stdout and "holds 4 rows" in r.stderr
    assert "Traceback" not in r.stderr


def _rewrite_shard(ds: Path, table: pa.Table, schema: pa.Schema) -> None:
    """Replace the only shard with ``table`` and fix up size + sha so only the content is wrong."""
    m = read_manifest(ds)
    f = ds / m.shards[0].file
    with pa.OSFile(str(f), "wb") as sink, ipc.new_file(sink, schema) as w:
        w.write_table(table)

    def fix(mm):
        mm["shards"][0].update(bytes=f.stat().st_size, sha256=sha256_file(f), num_rows=table.num_rows)
        mm["num_rows"] = table.num_rows

    _edit_manifest(ds, fix)


def test_a_shard_of_another_schema_is_refused(tmp_path):
    ds = tmp_path / "ds"
    write_records(ds, "PairRecord", pairs(2))
    other = pa.table({"id": ["a"], "text": ["b"]})
    _rewrite_shard(ds, other, other.schema)
    with pytest.raises(ShardError, match="does not have the PairRecord columns"):
        open_dataset(ds)


def test_non_utf8_text_inside_a_shard_is_refused_by_name(tmp_path):
    ds = tmp_path / "ds"
    write_records(ds, "PairRecord", pairs(2))
    t = open_dataset(ds).table()
    col = t.column("pos_text").combine_chunks()
    data = bytearray(col.buffers()[2].to_pybytes())
    data[0] = 0xFF  # invalid UTF-8, same length
    bad = pa.Array.from_buffers(pa.string(), len(col), [None, col.buffers()[1], pa.py_buffer(bytes(data))])
    t = t.set_column(t.schema.get_field_index("pos_text"), "pos_text", bad)
    schema = schema_for("PairRecord")
    _rewrite_shard(ds, t, schema)
    for verify in (True, False):
        with pytest.raises(ShardError, match="not valid UTF-8"):
            open_dataset(ds, verify=verify)


def test_flipped_bytes_are_caught_by_sha256(tmp_path):
    ds = tmp_path / "ds"
    write_records(ds, "PairRecord", pairs(3))
    f = ds / read_manifest(ds).shards[0].file
    raw = bytearray(f.read_bytes())
    i = raw.find(b"answer 1")
    raw[i] = ord("X")  # still valid Arrow and UTF-8: only the checksum knows
    f.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="sha256"):
        open_dataset(ds)


# ---------------------------------------------------------------------------------------------
# 6. non-UTF-8 text files: config YAML, manifests
# ---------------------------------------------------------------------------------------------
class _Cfg(Config):
    name: str = "x"


def test_non_utf8_yaml_and_manifest_name_the_file(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not UTF-8 text \(byte 9, line 1"):
        _Cfg.from_yaml(y)
    ds = tmp_path / "ds"
    write_records(ds, "PairRecord", pairs(1), provenance={"source": "toy"})
    (ds / MANIFEST).write_bytes((ds / MANIFEST).read_bytes().replace(b'"toy"', b'"t\xffy"'))
    with pytest.raises(ShardError, match="manifest.json: not UTF-8"):
        open_dataset(ds)
    r = subprocess.run([BIN / "cocoa-train", "--config", str(y), "--data", str(ds)], capture_output=True, text=True)
    assert r.returncode != 0 and "not UTF-8 text" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------
# 3. owned directories; 4. locks
# ---------------------------------------------------------------------------------------------
def test_remove_owned_tree_refuses_foreign_and_protected_dirs(tmp_path, monkeypatch):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(NotOwnedError, match="not made by cocoa"):
        remove_owned_tree(foreign)
    assert (foreign / "thesis.tex").exists()
    monkeypatch.chdir(foreign)
    mark_owned(foreign, "run")  # even marked, the working directory is never deleted
    with pytest.raises(NotOwnedError, match="working directory"):
        remove_owned_tree(Path("."))
    link = tmp_path / "link"
    link.symlink_to(foreign)
    with pytest.raises(NotOwnedError, match="symbolic link"):
        remove_owned_tree(link)
    ours = tmp_path / "ours"
    mark_owned(ours, "run")
    (ours / "x").write_text("1")
    remove_owned_tree(ours)
    assert not ours.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    remove_owned_tree(empty)
    assert not empty.exists()


def test_lock_is_exclusive_across_processes_and_released_on_sigkill(tmp_path):
    code = ("import sys, time; from cocoa.fs import exclusive_lock\n"
            "with exclusive_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(LockedError, match=rf"in use by another cocoa process \(pid {p.pid}"):
            with exclusive_lock(tmp_path):
                pass
        assert time.monotonic() - t0 < 2  # fails at once, never waits
    finally:
        p.kill()
        p.wait()
    with exclusive_lock(tmp_path):  # the kernel released the dead holder's lock
        pass


# ---------------------------------------------------------------------------------------------
# 12. a full disk: one line, nothing lost
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root and mount rights): {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_gives_one_line_and_keeps_committed_shards(tmp_path, small_disk):
    # a scenes benchmark larger than the disk: the command must fail with one line naming what to do
    r = subprocess.run([BIN / "cocoa-data", "scenes", "--out", str(small_disk / "bench"), "--train", "400",
                        "--eval-per-task", "4"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    err = r.stderr.strip()
    assert "Traceback" not in err and "no space left" in err.lower(), err
    assert len(err.splitlines()) <= 2, err
    # the shard writer: every shard the manifest lists is complete and verifies
    shutil.rmtree(small_disk / "bench")
    ds = small_disk / "ds"
    with pytest.raises(OSError):
        with ShardWriter(ds, "PairRecord", max_rows=20) as w:
            for i in range(10_000):
                w.write(pairs(1, start=i)[0])
    m = read_manifest(ds)
    assert not m.complete and m.shards
    for s in m.shards:
        assert sha256_file(ds / s.file) == s.sha256


# ---------------------------------------------------------------------------------------------
# audit A: foreign files in datasets, damaged manifests, unwritable directories
# ---------------------------------------------------------------------------------------------
def test_overwrite_refuses_a_cocoa_dataset_holding_foreign_files_and_names_them(tmp_path):
    from cocoa.fs import check_removable, foreign_entries

    ds = tmp_path / "ws" / "synthetic"
    write_records(ds, "PairRecord", pairs(3))
    write_records(ds / "parts" / "part-00000-of-00001", "PairRecord", pairs(2))
    write_records(ds / "quarantine", "PairRecord", pairs(1))
    (ds / ".merge.lock").write_text("")
    (ds / "images" / "ab").mkdir(parents=True)
    (ds / "images" / "ab" / ("ab" + "0" * 62 + ".png")).write_bytes(b"x")
    assert foreign_entries(ds) == []  # only what cocoa writes: removable
    clean = tmp_path / "clean"
    shutil.copytree(ds, clean)
    remove_owned_tree(clean)
    assert not clean.exists()

    (ds / "my_notes.txt").write_text("mine")
    (ds / "myanalysis").mkdir()
    (ds / "myanalysis" / "a.csv").write_text("x")
    (ds / "quarantine" / "keep.md").write_text("mine")
    (ds / "zz_more.txt").write_text("mine")
    with pytest.raises(NotOwnedError) as e:
        check_removable(ds)
    msg = str(e.value)
    assert "\n" not in msg and "my_notes.txt" in msg and "myanalysis/" in msg and "quarantine/keep.md" in msg
    assert "zz_more.txt" not in msg  # up to three named
    with pytest.raises(NotOwnedError):
        remove_owned_tree(ds)
    assert (ds / "my_notes.txt").read_text() == "mine" and (ds / "myanalysis" / "a.csv").exists()
    assert (ds / "shard-00000.arrow").exists()

    # a marked directory is cocoa's as a whole: what was put inside goes with it (documented)
    marked = tmp_path / "curated"
    mark_owned(marked, "curated")
    (marked / "my_notes.txt").write_text("mine")
    remove_owned_tree(marked)
    assert not marked.exists()


@pytest.mark.parametrize("text", ["[" * 100000, '{"format": "cocoa-shards", "num_rows": ' + "9" * 5000 + "}"])
def test_a_deeply_nested_or_huge_number_manifest_is_one_line_naming_it(tmp_path, text):
    ds = tmp_path / "ds"
    write_records(ds, "PairRecord", pairs(2))
    (ds / MANIFEST).write_text(text)
    with pytest.raises(ShardError) as e:
        read_manifest(ds)
    assert str(ds / MANIFEST) in str(e.value) and "\n" not in str(e.value)


def test_a_lock_that_cannot_be_created_is_one_line_whatever_the_oserror(tmp_path, monkeypatch):
    import errno
    import os as _os

    import cocoa.fs as fs

    real = _os.open

    def erofs(path, *a, **kw):
        if str(path).endswith(".cocoa.lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(fs.os, "open", erofs)
    with pytest.raises(LockedError, match="is not writable.*Read-only file system"):
        with exclusive_lock(tmp_path):
            pass
    monkeypatch.setattr(fs.os, "open", real)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / ".cocoa.lock").mkdir()  # something in the way: IsADirectoryError
    with pytest.raises(LockedError, match="is not writable"):
        with exclusive_lock(tmp_path / "d"):
            pass


@pytest.mark.parametrize("edit, words", [
    (lambda m: m["shards"][0].__setitem__("num_rows", float("nan")), "shards.0.num_rows"),
    (lambda m: m["shards"][0].pop("sha256"), "shards.0.sha256"),
    (lambda m: m.__setitem__("record_type", 3), "record_type"),
    (lambda m: m.__setitem__("complete", "yes"), "complete"),
    (lambda m: m.__setitem__("schema_version", "1"), "schema_version"),
    (lambda m: m.__setitem__("num_rows", True), "num_rows"),
])
def test_a_malformed_or_loosely_typed_manifest_is_one_line_without_a_pydantic_url(tmp_path, edit, words):
    ds = tmp_path / "ds"
    write_records(ds, "PairRecord", pairs(2))
    _edit_manifest(ds, edit)
    with pytest.raises(ShardError) as e:
        read_manifest(ds)
    msg = str(e.value)
    assert "\n" not in msg and "pydantic" not in msg and words in msg and "is malformed" in msg


def test_a_manifest_listing_a_directory_or_being_a_directory_says_so(tmp_path):
    ds = tmp_path / "ds"
    write_records(ds, "PairRecord", pairs(2))
    _edit_manifest(ds, lambda m: m["shards"][0].__setitem__("file", "."))
    with pytest.raises(UnsafePathError, match="is a directory, not a file"):
        read_manifest(ds)
    (ds / MANIFEST).unlink()
    (ds / MANIFEST).mkdir()
    with pytest.raises(ShardError, match="manifest.json is a directory"):
        read_manifest(ds)
