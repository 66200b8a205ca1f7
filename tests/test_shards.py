"""Arrow shards: round trips (cocoa reader, HF datasets, Polars), atomicity, verification, kills."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from cocoa.records import EvalRecord, ImageRef, PairRecord
from cocoa.shards import MANIFEST, ShardError, ShardWriter, Workspace, open_dataset, read_manifest, write_records


def img_bytes(i):
    buf = io.BytesIO()
    Image.new("RGB", (16 + i % 5, 12), ((37 * i) % 256, (91 * i) % 256, 7)).save(buf, format="PNG")
    return buf.getvalue()


def pairs(n, start=0):
    return [
        PairRecord(source="toy", qry_text=f"<|image_1|> what is {i}?", qry_image=ImageRef(bytes=img_bytes(i)),
                   pos_text=f"answer {i}", meta={"i": i})
        for i in range(start, start + n)
    ]


def test_roundtrip_cocoa_hf_polars(tmp_path):
    recs = pairs(23)
    m = write_records(tmp_path / "ds", "PairRecord", recs, max_rows=10, provenance={"made_by": "test"})
    assert m.complete and m.num_rows == 23 and [s.num_rows for s in m.shards] == [10, 10, 3]
    ds = open_dataset(tmp_path / "ds")
    assert list(ds) == recs  # streaming reader gives back equal records
    assert ds.manifest.provenance["made_by"] == "test"

    hf = ds.to_hf()
    assert len(hf) == 23
    first = hf[0]
    assert isinstance(first["qry_image"], Image.Image)
    assert first["qry_image"].tobytes() == Image.open(io.BytesIO(recs[0].qry_image.bytes)).tobytes()
    raw = hf.cast_column("qry_image", __import__("datasets").Image(decode=False))
    assert raw[5]["qry_image"]["bytes"] == recs[5].qry_image.bytes  # bytes-identical
    assert json.loads(first["meta"]) == {"i": 0}

    df = ds.scan().select("id", "pos_text").collect()
    assert df["id"].to_list() == [r.id for r in recs]


def test_eval_records_with_lists_roundtrip(tmp_path):
    rec = EvalRecord(dataset="D", meta_task="retrieval", split="OOD", qry_text="find it",
                     tgt_texts=["", "", "x"], tgt_images=[ImageRef(bytes=img_bytes(1)), ImageRef(path="images/a.png"), None])
    write_records(tmp_path / "ev", "EvalRecord", [rec])
    assert list(open_dataset(tmp_path / "ev")) == [rec]


def test_not_a_dataset_and_missing(tmp_path):
    with pytest.raises(ShardError, match="does not exist"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ShardError, match="not a cocoa dataset"):
        open_dataset(tmp_path / "plain")
    (tmp_path / "plain" / MANIFEST).write_text("{broken")
    with pytest.raises(ShardError, match="not valid JSON"):
        open_dataset(tmp_path / "plain")
    (tmp_path / "plain" / MANIFEST).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ShardError, match="not a cocoa manifest"):
        open_dataset(tmp_path / "plain")


def test_checksum_and_truncation_detected(tmp_path):
    write_records(tmp_path / "ds", "PairRecord", pairs(12), max_rows=5)
    shard = tmp_path / "ds" / read_manifest(tmp_path / "ds").shards[1].file
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-00001\.arrow fails its sha256"):
        open_dataset(tmp_path / "ds")
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(ShardError, match="truncated"):
        open_dataset(tmp_path / "ds")
    shard.unlink()
    with pytest.raises(ShardError, match="missing"):
        open_dataset(tmp_path / "ds")


def test_corrupt_shard_without_verification_gives_clear_error(tmp_path):
    write_records(tmp_path / "ds", "PairRecord", pairs(4))
    m = read_manifest(tmp_path / "ds")
    f = tmp_path / "ds" / m.shards[0].file
    f.write_bytes(b"\0" * m.shards[0].bytes)  # same size, garbage content
    with pytest.raises(ShardError, match="not a readable Arrow shard"):  # refused when opened, before use
        list(open_dataset(tmp_path / "ds", verify=False))


def test_schema_mismatch_and_wrong_type(tmp_path):
    write_records(tmp_path / "ds", "PairRecord", pairs(2))
    with pytest.raises(ShardError, match="holds PairRecord records, expected EvalRecord"):
        open_dataset(tmp_path / "ds", record_type="EvalRecord")
    with pytest.raises(ShardError, match="already holds a dataset"):
        write_records(tmp_path / "ds", "PairRecord", pairs(2))
    with pytest.raises(ShardError, match="holds PairRecord"):
        ShardWriter(tmp_path / "ds", "SynthRecord", mode="append")
    w = ShardWriter(tmp_path / "bad", "PairRecord")
    w.write_row({"id": 3})
    with pytest.raises(ShardError, match="do not match the PairRecord schema"):
        w.flush()


def test_incomplete_dataset_refused_then_resumed(tmp_path):
    w = ShardWriter(tmp_path / "ds", "PairRecord", max_rows=4)
    w.write_many(pairs(9))  # two shards committed, one row buffered
    with pytest.raises(ShardError, match="incomplete"):
        open_dataset(tmp_path / "ds")
    partial = open_dataset(tmp_path / "ds", allow_incomplete=True)
    assert len(partial) == 8
    w2 = ShardWriter(tmp_path / "ds", "PairRecord", mode="append", max_rows=4)
    w2.write_many(pairs(3, start=9))
    w2.close()
    ds = open_dataset(tmp_path / "ds")
    assert len(ds) == 11 and ds.manifest.complete


def test_overwrite_replaces_atomically(tmp_path):
    write_records(tmp_path / "ds", "PairRecord", pairs(7), max_rows=3)
    old_files = set(p.name for p in (tmp_path / "ds").glob("*.arrow"))
    write_records(tmp_path / "ds", "PairRecord", pairs(2, start=100), overwrite=True)
    ds = open_dataset(tmp_path / "ds")
    assert [r.meta["i"] for r in ds] == [100, 101]
    assert not old_files & set(p.name for p in (tmp_path / "ds").glob("*.arrow"))


WRITER = r"""
import io, sys, time
from PIL import Image
from cocoa.records import ImageRef, PairRecord
from cocoa.shards import ShardWriter
out, mode = sys.argv[1], sys.argv[2]
w = ShardWriter(out, "PairRecord", mode=mode, max_rows=50)
noise = bytes(range(256)) * 400  # ~100 KB per row: shards take a while to write
for i in range(100000):
    w.write(PairRecord(source="k", qry_text=f"q{i}", pos_text="p" + str(i), qry_image=ImageRef(bytes=noise + str(i).encode())))
    if i == 120:
        print("two shards committed", flush=True)
w.close()
"""


def test_killed_writer_leaves_nothing_a_reader_accepts(tmp_path):
    script = tmp_path / "w.py"
    script.write_text(WRITER)
    out = tmp_path / "ds"
    proc = subprocess.Popen([sys.executable, str(script), str(out), "create"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "two shards committed"
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with pytest.raises(ShardError, match="incomplete"):
        open_dataset(out)
    partial = open_dataset(out, allow_incomplete=True)  # what was committed verifies
    assert len(partial) >= 100 and len(partial) % 50 == 0
    # the next write completes cleanly and removes the leftovers of the killed one
    write_records(out, "PairRecord", pairs(5), overwrite=True)
    ds = open_dataset(out)
    assert len(ds) == 5
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    assert sorted(p.name for p in out.glob("*.arrow")) == sorted(s.file for s in ds.manifest.shards)


def test_workspace_layout():
    ws = Workspace("shards")
    assert ws.original == Path("shards/original") and ws.quarantine == Path("shards/synthetic/quarantine")
    assert ws.rejected == Path("shards/curated/rejected") and ws.mix == Path("shards/mix")


def test_inspect_cli(tmp_path):
    from click.testing import CliRunner

    from cocoa.cli.data import cli

    write_records(tmp_path / "ds", "PairRecord", pairs(3))
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "ds")])
    assert r.exit_code == 0, r.output
    assert "PairRecord" in r.output and "answer 0" in r.output
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path)])
    assert r.exit_code == 1 and "not a cocoa dataset" in r.output and "Traceback" not in r.output
