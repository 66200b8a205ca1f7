"""The data contract: validation, stable ids, image references, clear errors."""

import io

import pytest
from PIL import Image

from cocoa.records import (
    EvalRecord,
    ImageRef,
    MixRecord,
    PairRecord,
    RecordError,
    SynthRecord,
    decode_image,
    from_row,
    payload_json,
    to_row,
    validate_record,
)


def png(color=(200, 30, 30), size=(20, 16), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def synth(**kw):
    base = dict(
        parent_id="p1", image=ImageRef(bytes=png()), kind="caption", caption="a red cube",
        teacher={"backend": "scenes", "model": "scenes-teacher"}, template={"name": "caption", "hash": "abc"},
        params_hash="ph", key="k1",
    )
    base.update(kw)
    return SynthRecord(**base)


def test_ids_are_content_derived_and_stable():
    a = PairRecord(source="s", qry_text="what?", qry_image=ImageRef(bytes=png()), pos_text="red")
    b = PairRecord(source="s", qry_text="what?", qry_image=ImageRef(bytes=png()), pos_text="red")
    c = PairRecord(source="s", qry_text="what?", qry_image=ImageRef(bytes=png((0, 0, 255))), pos_text="red")
    assert a.id == b.id and len(a.id) == 32
    assert a.id != c.id
    # meta does not change identity; an explicit id is kept
    assert PairRecord(source="s", qry_text="what?", qry_image=ImageRef(bytes=png()), pos_text="red", meta={"x": 1}).id == a.id
    assert PairRecord(id="mine", source="s", qry_text="q", pos_text="p").id == "mine"


def test_unknown_field_and_wrong_type_are_named():
    with pytest.raises(RecordError, match=r"rec 7.*colour.*unknown field"):
        validate_record("PairRecord", {"source": "s", "qry_text": "q", "pos_text": "p", "colour": 1}, where="rec 7")
    with pytest.raises(RecordError, match=r"qry_text"):
        validate_record("PairRecord", {"source": "s", "qry_text": 5, "pos_text": "p"}, where="x")
    with pytest.raises(RecordError, match="unknown record type"):
        validate_record("Nope", {})


def test_empty_required_text():
    with pytest.raises(ValueError, match="query has neither text nor image"):
        PairRecord(source="s", qry_text="   ", pos_text="p")
    with pytest.raises(ValueError, match="positive has neither"):
        PairRecord(source="s", qry_text="q", pos_text="")
    with pytest.raises(ValueError, match="non-empty caption"):
        synth(caption=" ")
    with pytest.raises(ValueError, match="question and answer"):
        synth(kind="qa", caption=None, question="how many?", answer="")
    with pytest.raises(ValueError, match="positive candidate"):
        EvalRecord(dataset="d", meta_task="vqa", split="IND", qry_text="q", tgt_texts=["", "b"], tgt_images=[None, None])
    with pytest.raises(ValueError, match="must align"):
        EvalRecord(dataset="d", meta_task="vqa", split="IND", qry_text="q", tgt_texts=["a", "b"], tgt_images=[None])
    with pytest.raises(ValueError, match="stages"):
        MixRecord(origin="original", origin_id="x", stages=[4], text="t")


@pytest.mark.parametrize("bad", ["/etc/passwd", "../x.png", "a/../../x.png", "C:/x.png", ""])
def test_image_path_must_stay_under_root(bad):
    with pytest.raises(ValueError):
        ImageRef(path=bad)


def test_image_path_resolution(tmp_path):
    root = tmp_path / "root"
    (root / "img").mkdir(parents=True)
    (root / "img" / "a.png").write_bytes(png())
    ref = ImageRef(path="img/./a.png")
    assert ref.path == "img/a.png"
    assert ref.load(root).size == (20, 16)
    with pytest.raises(RecordError, match="missing"):
        ImageRef(path="img/none.png").load(root)
    with pytest.raises(RecordError, match="no data root"):
        ref.load(None)
    # a symlink pointing outside the root is refused
    (tmp_path / "outside.png").write_bytes(png())
    (root / "img" / "link.png").symlink_to(tmp_path / "outside.png")
    with pytest.raises(RecordError, match="escapes"):
        ImageRef(path="img/link.png").load(root)
    embedded = ImageRef.from_file(root / "img" / "a.png", root)
    assert embedded.bytes == png() and embedded.path == "img/a.png"
    with pytest.raises(RecordError, match="not under the data root"):
        ImageRef.from_file(tmp_path / "outside.png", root)


def test_decode_converts_modes_and_guards_bombs():
    for mode, color in [("RGBA", (10, 20, 30, 128)), ("L", 128), ("CMYK", (0, 50, 100, 0))]:
        buf = io.BytesIO()
        Image.new(mode, (8, 8), color).save(buf, format="JPEG" if mode == "CMYK" else "PNG")
        assert decode_image(buf.getvalue()).mode == "RGB"
    with pytest.raises(RecordError, match="decompression-bomb"):
        decode_image(png(size=(100, 100)), max_pixels=5000)
    with pytest.raises(RecordError, match="corrupt"):
        decode_image(png()[:30], name="broken.png")


def test_row_roundtrip_and_payload():
    rec = synth(meta={"a": [1, 2]})
    row = to_row(rec)
    assert isinstance(row["meta"], str)
    assert from_row("SynthRecord", row) == rec
    assert rec.text == "a red cube"
    assert "digest" in payload_json(rec) and "bytes" not in payload_json(rec)
    with pytest.raises(RecordError, match="f.arrow row 3.*meta"):
        from_row("SynthRecord", {**row, "meta": "{not json"}, where="f.arrow row 3")
