"""Each image stored once per workspace: the content-addressed store (``DATA/images/``), the records that refer
to it, every reader (cocoa's, ``datasets``, the training loader, curation), old datasets with embedded bytes,
and containment of store paths."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pytest

from cocoa.records import ImageRef, PairRecord, RecordError, SynthRecord
from cocoa.shards import ImageStore, Workspace, open_dataset, store_bytes, write_records

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("store")
    run = lambda *a: subprocess.run([str(BIN / a[0]), *a[1:]], cwd=cwd, capture_output=True, text=True, timeout=600)  # noqa: E731
    for cmd in (("cocoa-data", "synth", "--source", "scenes", "--scenes-n", "24", "--out", "shards/", "--no-progress",
                 "--commit-every", "8"),
                ("cocoa-data", "curate", "--no-progress"), ("cocoa-data", "mix", "--ratio", "1:1", "--no-progress")):
        r = run(*cmd)
        assert r.returncode == 0, r.stderr
    return Workspace(cwd / "shards")


def _image_columns(ds):
    return [n for n in ("qry_image", "pos_image", "neg_image", "image") if n in ds.schema.names]


def test_every_image_is_stored_once_and_datasets_hold_no_copies(workspace):
    ws = workspace
    files = sorted(p for p in ws.images.glob("*/*") if p.is_file())
    assert files and (ws.images / ".cocoa-owned").is_file()
    for f in files:  # named by content, each once
        assert f.stem == hashlib.sha256(f.read_bytes()).hexdigest() and f.parent.name == f.stem[:2]
    referenced = set()
    for d in (ws.original, ws.synthetic, ws.curated, ws.mix):
        ds = open_dataset(d)
        for n in _image_columns(ds):
            col = ds.table([n]).column(n)
            assert pc.struct_field(col, "bytes").null_count == len(col), f"{d}:{n} embeds image bytes"
            referenced |= {p for p in pc.struct_field(col, "path").to_pylist() if p}
    assert {f"../images/{f.parent.name}/{f.name}" for f in files} == referenced  # nothing stored twice or unused
    n, b = store_bytes(ws.root)
    assert n == len(files) and b == sum(f.stat().st_size for f in files)


def test_cocoa_reader_training_loader_and_curation_images_read_the_store(workspace):
    from cocoa.model.collate import load_image
    from cocoa.train.data import ArrowRecords

    ws = workspace
    for rec in open_dataset(ws.synthetic):
        assert rec.image.stored and min(rec.image.load(ws.synthetic).size) >= 28
    mix = ArrowRecords(ws.mix, "MixRecord")
    assert load_image(mix[0].image, ws.mix).size[0] > 0
    orig = ArrowRecords(ws.original, "PairRecord")
    p = orig[0]
    assert load_image(p.qry_image or p.pos_image, ws.original).size[0] > 0
    # curation analysed the stored images (no image rule fired for want of bytes)
    import json

    report = json.loads((ws.curated / "report.json").read_text())
    assert report["drops"]["image_unreadable"]["count"] == 0 and report["distinct_images"] > 0


def test_to_hf_decodes_store_images_from_any_directory(workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for d in (workspace.original, workspace.mix):
        hf = open_dataset(d).to_hf()
        col = "qry_image" if "qry_image" in hf.column_names else "image"
        v = next(r[col] for r in hf if r[col] is not None)
        assert hasattr(v, "size")


def test_old_dataset_with_embedded_bytes_still_reads_and_mix_moves_it_to_the_store(tmp_path):
    """Back-compat: a workspace written before the store (images embedded in every row) reads as before;
    `curate` keeps its rows as they are and `mix` stores their images once."""
    from cocoa.curation.config import CurationConfig
    from cocoa.curation.mix import run_mix
    from cocoa.curation.pipeline import run_curation
    from cocoa.sources.scenes import iter_train_pairs
    from cocoa.records import TeacherInfo, TemplateInfo

    ws = Workspace(tmp_path / "old")
    pairs = list(iter_train_pairs(6, seed=3))
    write_records(ws.original, "PairRecord", pairs)
    syn = [SynthRecord(parent_id=p.id, source=p.source, image=p.qry_image or p.pos_image, kind="caption",
                       caption=f"a detailed caption number {i} of a rendered scene with objects",
                       teacher=TeacherInfo(backend="scenes", model="m"), template=TemplateInfo(name="t", hash="h"),
                       params_hash="p", key=f"k{i}") for i, p in enumerate(pairs)]
    write_records(ws.synthetic, "SynthRecord", syn)
    write_records(ws.quarantine, "QuarantineRecord", [])
    assert all(r.image.bytes is not None for r in open_dataset(ws.synthetic))
    run_curation(ws.root, CurationConfig(), show_progress=False)
    assert len(open_dataset(ws.curated)) > 0 and all(r.image.bytes is not None for r in open_dataset(ws.curated))
    run_mix(ws.root, ratio="1:1", seed=0, show_progress=False)
    rows = list(open_dataset(ws.mix))
    assert rows and all(r.image.stored and r.image.load(ws.mix).size[0] > 0 for r in rows)


def test_store_put_is_content_addressed_atomic_and_idempotent(tmp_path):
    store = ImageStore(tmp_path)
    from PIL import Image

    ref = ImageRef.from_pil(Image.new("RGB", (30, 30), (1, 2, 3)))
    a = store.put(ref.bytes)
    b = store.put(bytes(ref.bytes))  # another object, same content
    assert a == b and a.stored and store.written == 1
    f = a.resolve(tmp_path / "synthetic")
    assert f.read_bytes() == ref.bytes and f.suffix == ".png"
    assert not [p for p in f.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
    (f.parent / f".{f.name}.tmp-123abc").write_bytes(b"half")  # what a killed writer leaves
    store.clean()
    assert [p.name for p in f.parent.iterdir()] == [f.name]


@pytest.mark.parametrize("path", ["../images/ab/../../etc/passwd", "../../images/ab/" + "ab" * 32 + ".png",
                                  "../images/ab/" + "cd" * 32 + ".png/..", "../other/ab/" + "ab" * 32 + ".png"])
def test_only_the_exact_store_form_may_leave_the_dataset_directory(path):
    with pytest.raises(ValueError, match="escapes|absolute"):
        ImageRef(path=path)


def test_a_store_symlink_out_of_the_workspace_is_refused(tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"\x89PNG secret")
    name = "ab" * 32
    (tmp_path / "ws" / "images" / "ab").mkdir(parents=True)
    os.symlink(outside, tmp_path / "ws" / "images" / "ab" / f"{name}.png")
    ref = ImageRef(path=f"../images/ab/{name}.png")
    with pytest.raises(RecordError, match="outside the image store"):
        ref.read_bytes(tmp_path / "ws" / "synthetic")
    # and curation reports it as an unreadable image instead of reading it
    from cocoa.curation.images import read_ref_bytes

    data, err = read_ref_bytes({"bytes": None, "path": ref.path}, tmp_path / "ws" / "synthetic")
    assert data is None and "outside the image store" in err


def test_pair_ids_do_not_depend_on_the_storage(tmp_path):
    pair = next(iter(__import__("cocoa.sources.scenes", fromlist=["x"]).iter_train_pairs(1, seed=0)))
    stored = ImageStore(tmp_path).store_record(pair)
    assert stored.id == pair.id and (stored.qry_image or stored.pos_image).stored
    assert isinstance(stored, PairRecord)
