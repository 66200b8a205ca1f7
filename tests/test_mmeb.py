"""MMEB-train / MMEB-eval readers on fixtures in the published layout (parquet + zips), and bad input."""

import io
import struct
import zipfile
import zlib

import pytest

from cocoa.sources import mmeb as M
from cocoa.testing.mmeb import write_mmeb_eval_fixture, write_mmeb_train_fixture, write_parquet
from cocoa.records import EvalRecord, PairRecord
from cocoa.shards import open_dataset


@pytest.fixture(scope="module")
def train_root(tmp_path_factory):
    return write_mmeb_train_fixture(tmp_path_factory.mktemp("mmeb_train"), n_per_subset=3)


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory):
    return write_mmeb_eval_fixture(tmp_path_factory.mktemp("mmeb_eval"), n_per_dataset=3, n_candidates=5)


def _img_bytes(mode, fmt, size=(20, 16)):
    from PIL import Image

    color = {"CMYK": (0, 200, 200, 0), "RGBA": (255, 0, 0, 128), "L": 128, "P": 3, "RGB": (1, 2, 3)}[mode]
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


def _png_header_only(w, h):
    """A PNG whose header claims w x h pixels (no real pixel data): a decompression-bomb stand-in."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_mmeb_v1_table():
    ds = M.mmeb_v1_datasets()
    assert len(ds) == 36 and len({d.name for d in ds}) == 36
    by_task = {t: sum(d.meta_task == t for d in ds) for t in ("classification", "vqa", "retrieval", "grounding")}
    assert by_task == {"classification": 10, "vqa": 10, "retrieval": 12, "grounding": 4}
    assert sum(d.split == "IND" for d in ds) == 20 and sum(d.split == "OOD" for d in ds) == 16
    assert all((d.split == "IND") == bool(d.train_subset) for d in ds)
    subsets = M.mmeb_train_subsets()
    assert len(subsets) == 20 and "ImageNet_1K" in subsets and "MSCOCO_t2i" in subsets
    t = M.mmeb_v1_by_name()
    assert t["ImageNet-1K"].train_subset == "ImageNet_1K" and t["RefCOCO"].split == "OOD"


def test_train_round_trip_from_zips(train_root, tmp_path):
    report = M.SourceReport()
    recs = list(M.iter_mmeb_train(train_root, report=report))
    assert len(recs) == 12 and report.summary()["rows_skipped"] == 0
    assert {r.source for r in recs} == {"ImageNet_1K", "OK-VQA", "MSCOCO_t2i", "MSCOCO"}
    cls = [r for r in recs if r.source == "ImageNet_1K"][0]
    assert cls.qry_text.startswith("<|image_1|>\n") and cls.pos_image is None  # placeholder kept verbatim
    with zipfile.ZipFile(train_root / "images_zip" / "ImageNet_1K.zip") as z:
        assert cls.qry_image.bytes == z.read(cls.qry_image.path)  # bytes straight from the zip, path kept
    assert cls.qry_image.load().mode == "RGB"
    ground = [r for r in recs if r.source == "MSCOCO"][0]
    assert ground.pos_image.bytes and "cropped" in ground.pos_text
    t2i = [r for r in recs if r.source == "MSCOCO_t2i"][0]
    assert t2i.qry_image is None and t2i.pos_image is not None
    assert any(r.neg_text for r in recs if r.source == "OK-VQA")
    # subset selection, caps, the other split
    few = list(M.iter_mmeb_train(train_root, subsets=["OK-VQA"], max_per_subset=2))
    assert [r.source for r in few] == ["OK-VQA", "OK-VQA"]
    div = list(M.iter_mmeb_train(train_root, subsets=["ImageNet_1K"], split="diverse_instruction"))
    assert "category" in div[0].qry_text and div[0].qry_image.bytes == cls.qry_image.bytes
    # written as shards: readable by cocoa and by HF datasets, images embedded
    summary = M.write_mmeb_train(train_root, tmp_path / "original", subsets=["MSCOCO", "ImageNet_1K"])
    assert summary["rows_kept"] == 6
    ds = open_dataset(tmp_path / "original")
    back = list(ds)
    assert all(isinstance(r, PairRecord) for r in back) and [r.id for r in back] == [
        r.id for r in recs if r.source == "MSCOCO"] + [r.id for r in recs if r.source == "ImageNet_1K"]
    assert ds.manifest.provenance["report"]["rows_kept"] == 6
    hf = ds.to_hf()
    assert hf[0]["qry_image"].size == (112, 112)
    assert len(open_dataset(tmp_path / "original" / "quarantine")) == 0


def test_train_from_extracted_dir_and_old_split(train_root, tmp_path):
    # parquet only + extracted images (unzip -d DIR): the same records as from the zips
    snap = tmp_path / "snap"
    imgs = tmp_path / "extracted"
    for sub in ("ImageNet_1K", "MSCOCO"):
        (snap / sub).mkdir(parents=True)
        src = train_root / sub / "original-00000-of-00001.parquet"
        (snap / sub / "train-00000-of-00001.parquet").write_bytes(src.read_bytes())  # an older copy: split `train`
        with zipfile.ZipFile(train_root / "images_zip" / f"{sub}.zip") as z:
            z.extractall(imgs)
    from_dir = list(M.iter_mmeb_train(snap, image_dir=imgs))
    from_zip = list(M.iter_mmeb_train(train_root, subsets=["ImageNet_1K", "MSCOCO"]))
    assert [r.id for r in from_dir] == [r.id for r in from_zip] and len(from_dir) == 6
    assert from_dir[0].meta["split"] == "train"
    # images extracted one level down (members without the leading images/) are found too
    flat = tmp_path / "flat"
    (imgs / "images").rename(flat)
    assert [r.id for r in M.iter_mmeb_train(snap, image_dir=flat)] == [r.id for r in from_zip]
    with pytest.raises(M.MMEBError, match="no 'diverse_instruction' split.*found: train"):
        list(M.iter_mmeb_train(snap, split="diverse_instruction"))


def test_eval_round_trip(eval_root, tmp_path):
    from cocoa.sources.scenes import load_eval_hf

    recs = list(M.iter_mmeb_eval(eval_root))
    assert len(recs) == 12
    by = {r.dataset: r for r in recs}
    assert (by["ImageNet-1K"].meta_task, by["ImageNet-1K"].split) == ("classification", "IND")
    assert (by["RefCOCO"].meta_task, by["RefCOCO"].split) == ("grounding", "OOD")
    assert by["ImageNet-1K"].tgt_images == [None] * 5 and by["ImageNet-1K"].qry_image.bytes
    t2i = by["MSCOCO_t2i"]
    assert t2i.qry_image is None and all(x is not None for x in t2i.tgt_images) and len(t2i.tgt_texts) == 5
    summary = M.write_mmeb_eval(eval_root, tmp_path / "eval", datasets=["MSCOCO_t2i", "RefCOCO", "OK-VQA"])
    assert summary["rows_kept"] == 9 and summary["rows_skipped"] == 0
    d = tmp_path / "eval" / "MSCOCO_t2i"
    rows = list(open_dataset(d))
    assert all(isinstance(r, EvalRecord) for r in rows)
    paths = [x.path for r in rows for x in r.tgt_images]
    assert all(p.startswith("images/") for p in paths)
    assert len(set(paths)) < len(paths)  # shared candidates are stored once
    with zipfile.ZipFile(eval_root / "images.zip") as z:
        assert rows[0].tgt_images[0].read_bytes(root=d) == z.read("MSCOCO_t2i/MSCOCO_t2i_0.jpg")
    hf = load_eval_hf(tmp_path / "eval" / "RefCOCO")
    assert hf[0]["tgt_images"][0].size == (56, 56) and hf[0]["qry_image"].size == (112, 112)
    assert open_dataset(tmp_path / "eval" / "quarantine").record_type == "QuarantineRecord"


def test_bad_rows_are_skipped_counted_and_quarantined(tmp_path):
    good = _img_bytes("RGB", "JPEG")
    truncated = good[: len(good) // 2]
    base = "images/ImageNet_1K/Train/"
    rows = [
        {"qry": "<|image_1|>\nRepresent", "qry_image_path": base + "absent.jpg", "pos_text": "x", "pos_image_path": ""},
        {"qry": "<|image_1|>\nRepresent", "qry_image_path": base + "garbage.jpg", "pos_text": "x", "pos_image_path": ""},
        {"qry": "<|image_1|>\nRepresent", "qry_image_path": base + "truncated.jpg", "pos_text": "x", "pos_image_path": ""},
        {"qry": "<|image_1|>\nRepresent", "qry_image_path": "images/../../secret.jpg", "pos_text": "x", "pos_image_path": ""},
        {"qry": "<|image_1|>\nRepresent", "qry_image_path": "/etc/passwd", "pos_text": "x", "pos_image_path": ""},
        {"qry": "<|image_1|>\nRepresent", "qry_image_path": base + "bomb.png", "pos_text": "x", "pos_image_path": ""},
        {"qry": "", "qry_image_path": "", "pos_text": "x", "pos_image_path": ""},
        {"qry": "<|image_1|>\nRepresent", "qry_image_path": base + "cmyk.jpg", "pos_text": "c", "pos_image_path": ""},
        {"qry": "<|image_1|>\nRepresent", "qry_image_path": base + "rgba.png", "pos_text": "a", "pos_image_path": ""},
        {"qry": "<|image_1|>\nRepresent", "qry_image_path": base + "gray.png", "pos_text": "g", "pos_image_path": ""},
        {"qry": "<|image_1|>\nRepresent", "qry_image_path": base + "palette.gif", "pos_text": "p", "pos_image_path": ""},
    ]
    members = {base + "garbage.jpg": b"\xff\xd8\xff\xe0 not really a jpeg", base + "truncated.jpg": truncated,
               base + "bomb.png": _png_header_only(100_000, 100_000), base + "cmyk.jpg": _img_bytes("CMYK", "JPEG"),
               base + "rgba.png": _img_bytes("RGBA", "PNG"), base + "gray.png": _img_bytes("L", "PNG"),
               base + "palette.gif": _img_bytes("P", "GIF")}
    root = write_mmeb_train_fixture(tmp_path / "t", subsets=["ImageNet_1K"], n_per_subset=2, splits=("original",),
                                    extra_rows={"ImageNet_1K": rows}, extra_members={"ImageNet_1K": members})
    report = M.SourceReport()
    recs = list(M.iter_mmeb_train(root, report=report))
    assert report.skipped == {"missing_image": 1, "corrupt_image": 2, "unsafe_path": 2, "image_too_large": 1,
                              "invalid_row": 1}
    assert len(report.quarantine) == 7 and all(q.stage == "source" for q in report.quarantine)
    missing = [q for q in report.quarantine if q.reason == "missing_image"][0]
    assert "absent.jpg" in missing.detail and "ImageNet_1K.zip" in missing.detail and "row 2" in missing.detail
    assert "decompression-bomb" in [q for q in report.quarantine if q.reason == "image_too_large"][0].detail
    # CMYK / RGBA / grayscale / palette images are kept, converted to RGB
    conv = {r.pos_text: r for r in recs if r.pos_text in "cagp"}
    assert set(conv) == {"c", "a", "g", "p"} and report.converted == 4
    for r in conv.values():
        from PIL import Image

        assert Image.open(io.BytesIO(r.qry_image.bytes)).mode == "RGB" and r.qry_image.load().mode == "RGB"
    assert len(recs) == 2 + 4 and report.summary()["rows_read"] == 13
    # the written dataset carries the quarantine beside it
    M.write_mmeb_train(root, tmp_path / "out")
    q = list(open_dataset(tmp_path / "out" / "quarantine"))
    assert sorted(x.reason for x in q) == sorted(x.reason for x in report.quarantine)
    # strict mode stops at the first bad row, naming file and row
    with pytest.raises(M.MMEBError, match=r"original-00000-of-00001.parquet row 2: image .*absent.jpg"):
        list(M.iter_mmeb_train(root, on_error="raise"))
    # a smaller pixel limit applies to ordinary images too
    rep2 = M.SourceReport()
    assert list(M.iter_mmeb_train(root, max_per_subset=1, max_pixels=100, report=rep2)) == []
    assert rep2.skipped["image_too_large"] >= 1


def test_structural_errors(train_root, eval_root, tmp_path):
    with pytest.raises(M.MMEBError, match="unknown MMEB-train subset.*'ImageNet-1K'.*known: .*ImageNet_1K"):
        list(M.iter_mmeb_train(train_root, subsets=["ImageNet-1K"]))
    with pytest.raises(M.MMEBError, match="unknown MMEB-eval dataset.*known: ImageNet-1K"):
        list(M.iter_mmeb_eval(eval_root, datasets=["ImageNet_1K"]))
    bad = tmp_path / "bad"
    write_parquet(bad / "ImageNet_1K" / "original-00000-of-00001.parquet",
                  [{"qry": "q", "qry_image_path": "", "pos_image_path": ""}])
    with pytest.raises(M.MMEBError, match=r"lacks column\(s\) pos_text .*expected the MMEB layout"):
        list(M.iter_mmeb_train(bad))
    write_parquet(bad / "ev" / "GQA" / "test-00000-of-00001.parquet", [{"qry_text": "q", "qry_img_path": ""}])
    with pytest.raises(M.MMEBError, match=r"lacks column\(s\) tgt_text, tgt_img_path"):
        list(M.iter_mmeb_eval(bad / "ev"))
    # offline with no local copy: say which layout to provide (conftest sets HF_HUB_OFFLINE=1)
    with pytest.raises(M.MMEBError, match="offline.*ROOT/<Subset>/<split>-\\*.parquet"):
        list(M.iter_mmeb_train("TIGER-Lab/MMEB-train", subsets=["ImageNet_1K"]))
    with pytest.raises(M.MMEBError, match="offline.*images.zip"):
        list(M.iter_mmeb_eval("TIGER-Lab/MMEB-eval", datasets=["GQA"]))
    with pytest.raises(M.MMEBError, match="does not exist"):
        list(M.iter_mmeb_train(tmp_path / "nowhere" / "x"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(M.MMEBError, match="holds no parquet files"):
        list(M.iter_mmeb_train(empty))
    with pytest.raises(M.MMEBError, match="unknown MMEB-train split"):
        list(M.iter_mmeb_train(train_root, split="test"))
    with pytest.raises(M.MMEBError, match="unknown MMEB-V1 dataset"):
        write_mmeb_eval_fixture(tmp_path / "x", datasets=["NotADataset"])
    # eval: a row whose candidate image is missing is skipped whole and reported
    root = write_mmeb_eval_fixture(tmp_path / "ev2", datasets=["MSCOCO_t2i"], n_per_dataset=2, n_candidates=3,
                                   extra_rows={"MSCOCO_t2i": [{"qry_text": "q", "qry_img_path": "",
                                                               "tgt_text": ["<|image_1|>", "<|image_1|>"],
                                                               "tgt_img_path": ["MSCOCO_t2i/MSCOCO_t2i_0.jpg", "MSCOCO_t2i/gone.jpg"]}]})
    rep = M.SourceReport()
    assert len(list(M.iter_mmeb_eval(root, report=rep))) == 2
    assert rep.skipped == {"missing_image": 1} and "gone.jpg" in rep.quarantine[0].detail
