"""The one data contract every cocoa stage shares.

Pydantic v2 models describe the records; :data:`ARROW_SCHEMAS` and :data:`HF_FEATURES` say how each
record type is laid out in Arrow shards (see :mod:`cocoa.shards`).

Images are :class:`ImageRef` values: embedded bytes, or a POSIX path relative to a data root
(the dataset directory the record is stored in, or a source root such as an MMEB image folder).
Absolute paths and paths that climb out of their root are refused, except the one form that refers to
the workspace's content-addressed image store (``../images/<xx>/<sha256>.<ext>``, :data:`STORE_PATH`), which
may only resolve inside the ``images/`` directory beside the dataset directory. In Arrow an ``ImageRef`` is a
``struct<bytes: binary, path: string>``: exactly the storage of Hugging Face ``datasets.Image``,
so ``datasets`` decodes embedded images to PIL with no cocoa code involved.

Record ids are content-derived (xxh3-128 of a canonical JSON of the content fields), so the same
input always gets the same id.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
from json.encoder import encode_basestring as _enc
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Literal

import pyarrow as pa
import xxhash
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import CocoaError

SCHEMA_VERSION = 1

MetaTask = Literal["classification", "vqa", "retrieval", "grounding"]
EvalSplit = Literal["IND", "OOD"]
SynthKind = Literal["caption", "qa"]

# Decompression-bomb guard used everywhere an image is decoded (pixels).
MAX_IMAGE_PIXELS = 64_000_000


class RecordError(CocoaError):
    """A record (or the file it came from) is not valid. The message names it and says what to do."""


def digest(data: bytes | str) -> str:
    """Stable 128-bit hex digest (xxh3) used for ids, keys and caches."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return xxhash.xxh3_128_hexdigest(data)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def content_id(*parts: Any) -> str:
    """Content-derived id: the same parts always give the same id."""
    return digest(canonical_json(list(parts)))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


# A reference into the workspace's image store (``DATA/images/<xx>/<sha256>.<ext>``, written by
# :class:`cocoa.shards.ImageStore`), as seen from a dataset directory directly under the workspace
# (``original/``, ``synthetic/``, ``curated/``, ``mix/``): the only path that may climb out of its dataset
# directory, and only into the workspace's ``images/``.
STORE_PATH = re.compile(r"^\.\./images/([0-9a-f]{2})/\1[0-9a-f]{62}\.(?:png|jpg|gif|webp|bmp|tif|img)$")


def is_store_path(path: str | None) -> bool:
    return path is not None and STORE_PATH.match(path) is not None


def _check_relpath(path: str) -> str:
    if not path:
        raise ValueError("empty image path")
    if STORE_PATH.match(path):
        return path
    p = path.replace("\\", "/")
    if p.startswith("/") or PurePosixPath(p).is_absolute() or (len(p) > 1 and p[1] == ":"):
        raise ValueError(
            f"image path {path!r} is absolute; store paths relative to the data root (the dataset directory)"
        )
    norm = posixpath.normpath(p)
    if norm == ".." or norm.startswith("../"):
        raise ValueError(f"image path {path!r} escapes its data root (it climbs out with '..')")
    return norm


_Bytes = bytes  # the field below is named `bytes` (datasets.Image layout) and shadows the builtin


class ImageRef(_Model):
    """An image: embedded encoded bytes (PNG/JPEG/...) and/or a path relative to a data root.

    A path of the form ``../images/<xx>/<sha256>.<ext>`` (:data:`STORE_PATH`) refers to the workspace's
    content-addressed image store, the ``images/`` directory beside the dataset directory holding the record
    (``stored`` is true): each image is stored once per workspace and every dataset refers to it."""

    bytes: _Bytes | None = None
    path: str | None = None

    @field_validator("path")
    @classmethod
    def _v_path(cls, v: str | None) -> str | None:
        return None if v is None else _check_relpath(v)

    @model_validator(mode="after")
    def _v_any(self) -> ImageRef:
        if self.bytes is None and self.path is None:
            raise ValueError("an ImageRef needs bytes or a path")
        return self

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def from_pil(cls, image: Any, format: str = "PNG", path: str | None = None) -> ImageRef:
        buf = io.BytesIO()
        image.save(buf, format=format)
        return cls(bytes=buf.getvalue(), path=path)

    @classmethod
    def from_file(cls, file: str | Path, root: str | Path, embed: bool = True) -> ImageRef:
        """A reference to ``file`` (which must lie under ``root``), embedding its bytes by default."""
        file, root = Path(file), Path(root)
        try:
            rel = file.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            raise RecordError(f"image {file} is not under the data root {root}") from None
        ref = cls(path=rel)
        return cls(bytes=ref.read_bytes(root), path=rel) if embed else ref

    # -- access ---------------------------------------------------------------------------------
    def resolve(self, root: str | Path | None) -> Path:
        """The file this reference points to under ``root``; refuses paths escaping the root."""
        if self.path is None:
            raise RecordError("this image is embedded (no path) and has no file to resolve")
        if root is None:
            raise RecordError(f"image path {self.path!r} is relative and no data root was given")
        root = Path(root).resolve()
        full = (root / self.path).resolve()
        if is_store_path(self.path):  # the workspace's image store: only inside <dataset dir>/../images
            store = root.parent / "images"
            if store not in full.parents:
                raise RecordError(f"image path {self.path!r} resolves outside the image store {store} (a symlink); "
                                  "cocoa reads store images only from inside it: remove the link and rerun the command")
            return full
        if full != root and root not in full.parents:
            raise RecordError(f"image path {self.path!r} escapes its data root {root} (symlink or '..')")
        return full

    def read_bytes(self, root: str | Path | None = None) -> _Bytes:
        if self.bytes is not None:
            return self.bytes
        full = self.resolve(root)
        if not full.is_file():
            raise RecordError(
                f"image file {full} is missing (referenced as {self.path!r} under {root}); "
                "restore the file or regenerate the dataset"
            )
        return full.read_bytes()

    def load(self, root: str | Path | None = None) -> Any:
        """Decode to an RGB PIL image (CMYK/RGBA/grayscale converted; bomb-guarded)."""
        return decode_image(self.read_bytes(root), name=self.path or "<embedded image>")

    @property
    def stored(self) -> bool:
        """Whether this is a reference into the workspace's image store (no bytes, a store path)."""
        return self.bytes is None and is_store_path(self.path)

    def digest(self, root: str | Path | None = None) -> str:
        return digest(self.read_bytes(root))


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _png_expected_bytes(w: int, h: int, depth: int, color: int, interlace: int) -> int:
    """Bytes of a PNG's decompressed IDAT stream (filter byte + packed pixels, per row of each pass)."""
    bpp = _PNG_CHANNELS[color] * depth

    def rows(pw: int, ph: int) -> int:
        return 0 if pw == 0 or ph == 0 else ph * (1 + (pw * bpp + 7) // 8)

    if not interlace:
        return rows(w, h)
    total = 0  # Adam7: (x0, y0, dx, dy) of the seven passes
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)):
        total += rows((w - x0 + dx - 1) // dx if w > x0 else 0, (h - y0 + dy - 1) // dy if h > y0 else 0)
    return total


def _check_png_complete(data: bytes, name: str) -> None:
    """Pillow's PNG decoder takes a zlib stream that ends early as the end of the image and pads the rest
    (black): count the decompressed IDAT bytes (streamed, never held) against what the header needs."""
    import struct
    import zlib

    pos, ihdr, d = 8, None, zlib.decompressobj()
    got = 0
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if ctype == b"IHDR" and len(chunk) >= 13:
            ihdr = struct.unpack(">IIBBBBB", chunk[:13])
        elif ctype == b"IDAT":
            buf = d.decompress(chunk, 1 << 20)
            while True:
                got += len(buf)
                if not d.unconsumed_tail:
                    break
                buf = d.decompress(d.unconsumed_tail, 1 << 20)
        elif ctype == b"IEND":
            break
    if ihdr is None or ihdr[3] not in _PNG_CHANNELS:
        return  # Pillow read it; nothing to compare against
    w, h, depth, color, _comp, _filt, interlace = ihdr
    need = _png_expected_bytes(w, h, depth, color, interlace)
    if got < need:
        raise RecordError(f"image {name} is a truncated PNG: its pixel data holds {got} of the {need} bytes its "
                          f"{w}x{h} header needs; it is corrupt (re-export or download it again)")


def decode_image(data: bytes, name: str = "<image>", max_pixels: int = MAX_IMAGE_PIXELS) -> Any:
    """Decode image bytes to an RGB PIL image, with a clear error for corrupt or oversized input."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise RecordError(
                    f"image {name} is {w}x{h} = {w * h} pixels, above the limit of {max_pixels} "
                    "(decompression-bomb guard); downscale it or raise the limit"
                )
            im.load()  # a full decode; ImageFile.LOAD_TRUNCATED_IMAGES is never set by cocoa
            if im.format == "PNG":
                _check_png_complete(data, name)
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            if im.mode in ("RGBA", "LA"):
                bg = Image.new("RGB", im.size, (255, 255, 255))
                bg.paste(im, mask=im.getchannel("A"))
                return bg
            return im.convert("RGB") if im.mode != "RGB" else im.copy()
    except RecordError:
        raise
    except Exception as e:  # PIL raises many types for corrupt data
        raise RecordError(f"image {name} cannot be decoded ({type(e).__name__}: {e}); it is corrupt or not an image") from None


def _image_key(img: ImageRef | None) -> str | None:
    if img is None:
        return None
    return digest(img.bytes) if img.bytes is not None else "path:" + (img.path or "")


class _WithId(_Model):
    id: str = ""
    ID_FIELDS: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="after")
    def _v_id(self):  # type: ignore[no-untyped-def]
        if not self.id:
            parts = []
            for name in self.ID_FIELDS:
                v = getattr(self, name)
                if isinstance(v, ImageRef):
                    v = _image_key(v)
                elif isinstance(v, list):
                    v = [_image_key(x) if isinstance(x, ImageRef) else x for x in v]
                elif isinstance(v, BaseModel):
                    v = v.model_dump()
                parts.append(v)
            object.__setattr__(self, "id", content_id(type(self).__name__, *parts))
        return self


def _nonblank(text: str | None, image: ImageRef | None, what: str) -> None:
    if (text is None or not text.strip()) and image is None:
        raise ValueError(f"{what} has neither text nor image (empty text and no image); give at least one")


class PairRecord(_WithId):
    """A training pair shaped like MMEB-train: query (text and/or image) -> positive (text and/or image)."""

    source: str = Field(min_length=1)
    qry_text: str = ""
    qry_image: ImageRef | None = None
    pos_text: str = ""
    pos_image: ImageRef | None = None
    neg_text: str | None = None
    neg_image: ImageRef | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    ID_FIELDS: ClassVar[tuple[str, ...]] = ("source", "qry_text", "qry_image", "pos_text", "pos_image", "neg_text", "neg_image")

    @model_validator(mode="after")
    def _v_content(self) -> PairRecord:
        _nonblank(self.qry_text, self.qry_image, "the query")
        _nonblank(self.pos_text, self.pos_image, "the positive")
        return self


class TeacherInfo(_Model):
    backend: str = Field(min_length=1)
    model: str = Field(min_length=1)
    revision: str = ""


class TemplateInfo(_Model):
    name: str = Field(min_length=1)
    hash: str = Field(min_length=1)


class SynthRecord(_WithId):
    """Teacher output for one image: a fine-grained caption or one question-answer pair."""

    parent_id: str = Field(min_length=1)
    source: str = ""
    image: ImageRef
    kind: SynthKind
    caption: str | None = None
    question: str | None = None
    answer: str | None = None
    teacher: TeacherInfo
    template: TemplateInfo
    params_hash: str = Field(min_length=1)
    key: str = Field(min_length=1)
    meta: dict[str, Any] = Field(default_factory=dict)

    ID_FIELDS: ClassVar[tuple[str, ...]] = ("key", "kind", "caption", "question", "answer")

    @model_validator(mode="after")
    def _v_kind(self) -> SynthRecord:
        if self.kind == "caption":
            if not (self.caption or "").strip():
                raise ValueError("a caption record needs a non-empty caption")
            if self.question is not None or self.answer is not None:
                raise ValueError("a caption record carries no question/answer")
        else:
            if not (self.question or "").strip() or not (self.answer or "").strip():
                raise ValueError("a qa record needs a non-empty question and answer")
            if self.caption is not None:
                raise ValueError("a qa record carries no caption")
        return self

    @property
    def text(self) -> str:
        return self.caption if self.kind == "caption" else f"{self.question} {self.answer}"  # type: ignore[return-value]


class EvalRecord(_WithId):
    """An evaluation query shaped like MMEB-eval: candidate 0 is the positive."""

    dataset: str = Field(min_length=1)
    meta_task: MetaTask
    split: EvalSplit
    qry_text: str = ""
    qry_image: ImageRef | None = None
    tgt_texts: list[str]
    tgt_images: list[ImageRef | None]
    meta: dict[str, Any] = Field(default_factory=dict)

    ID_FIELDS: ClassVar[tuple[str, ...]] = ("dataset", "qry_text", "qry_image", "tgt_texts", "tgt_images")

    @model_validator(mode="after")
    def _v_targets(self) -> EvalRecord:
        _nonblank(self.qry_text, self.qry_image, "the query")
        if not self.tgt_texts:
            raise ValueError("an evaluation record needs at least one candidate (tgt_texts is empty)")
        if len(self.tgt_texts) != len(self.tgt_images):
            raise ValueError(
                f"tgt_texts has {len(self.tgt_texts)} entries but tgt_images has {len(self.tgt_images)}; "
                "they must align (use '' / null where a candidate has no text / image)"
            )
        _nonblank(self.tgt_texts[0], self.tgt_images[0], "the positive candidate (index 0)")
        return self


class MixRecord(_WithId):
    """One row of the training mixture (``mix/``), with provenance and the stages it serves.

    Stage 1 reads ``image`` + ``text`` (a caption, an answer, or a positive text); stage 2 reads
    block A = ``image`` + ``prompt`` and block B = ``text``. Stage 3 reads query/positive pairs from
    ``original/`` (PairRecord) by default.
    """

    origin: Literal["original", "synthetic"]
    origin_id: str = Field(min_length=1)
    source: str = ""
    stages: list[int]
    image: ImageRef | None = None
    prompt: str = ""
    text: str = Field(min_length=1)
    meta: dict[str, Any] = Field(default_factory=dict)

    ID_FIELDS: ClassVar[tuple[str, ...]] = ("origin", "origin_id", "prompt", "text")

    @field_validator("stages")
    @classmethod
    def _v_stages(cls, v: list[int]) -> list[int]:
        if not v or any(s not in (1, 2, 3) for s in v):
            raise ValueError(f"stages must be a non-empty subset of 1, 2, 3 (got {v})")
        return sorted(set(v))


class QuarantineRecord(_WithId):
    """A row that was set aside, never dropped silently: teacher output that failed validation
    (``stage="synth"``, with the raw text) or a row a curation rule rejected (``stage="curate"``).
    ``payload`` is the offending record as JSON (image bytes replaced by their digest)."""

    stage: Literal["synth", "curate", "mix", "source"]
    reason: str = Field(min_length=1)
    detail: str = ""
    record_id: str = ""
    key: str = ""
    parent_id: str = ""
    raw: str = ""
    payload: str = ""
    meta: dict[str, Any] = Field(default_factory=dict)

    ID_FIELDS: ClassVar[tuple[str, ...]] = ("stage", "reason", "record_id", "key", "raw")


def quarantine_id(stage: str, reason: str, record_id: str = "", key: str = "", raw: str = "") -> str:
    """``QuarantineRecord(stage=..., reason=..., ...).id`` without building the model, for writers of many rows.

    The same bytes as :func:`content_id` of the class name and ``ID_FIELDS`` (all strings, so
    ``canonical_json`` of the list is each string's ``encode_basestring``, comma-joined); about 25x faster
    than the model, which matters for a curation run that rejects hundreds of thousands of rows."""
    return digest(f'["QuarantineRecord",{_enc(stage)},{_enc(reason)},{_enc(record_id)},{_enc(key)},{_enc(raw)}]')


RECORD_TYPES: dict[str, type[_WithId]] = {
    "PairRecord": PairRecord,
    "SynthRecord": SynthRecord,
    "EvalRecord": EvalRecord,
    "MixRecord": MixRecord,
    "QuarantineRecord": QuarantineRecord,
}

# ---------------------------------------------------------------------------------------------
# Arrow layout. ``meta`` is stored as a JSON string; images as struct<bytes, path> (datasets.Image).
# ---------------------------------------------------------------------------------------------
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_STR = pa.string()

ARROW_SCHEMAS: dict[str, pa.Schema] = {
    "PairRecord": pa.schema(
        [
            ("id", _STR), ("source", _STR), ("qry_text", _STR), ("qry_image", IMAGE_TYPE),
            ("pos_text", _STR), ("pos_image", IMAGE_TYPE), ("neg_text", _STR), ("neg_image", IMAGE_TYPE),
            ("meta", _STR),
        ]
    ),
    "SynthRecord": pa.schema(
        [
            ("id", _STR), ("parent_id", _STR), ("source", _STR), ("image", IMAGE_TYPE), ("kind", _STR),
            ("caption", _STR), ("question", _STR), ("answer", _STR),
            ("teacher", pa.struct([("backend", _STR), ("model", _STR), ("revision", _STR)])),
            ("template", pa.struct([("name", _STR), ("hash", _STR)])),
            ("params_hash", _STR), ("key", _STR), ("meta", _STR),
        ]
    ),
    "EvalRecord": pa.schema(
        [
            ("id", _STR), ("dataset", _STR), ("meta_task", _STR), ("split", _STR), ("qry_text", _STR),
            ("qry_image", IMAGE_TYPE), ("tgt_texts", pa.list_(_STR)), ("tgt_images", pa.list_(IMAGE_TYPE)),
            ("meta", _STR),
        ]
    ),
    "MixRecord": pa.schema(
        [
            ("id", _STR), ("origin", _STR), ("origin_id", _STR), ("source", _STR), ("stages", pa.list_(pa.int8())),
            ("image", IMAGE_TYPE), ("prompt", _STR), ("text", _STR), ("meta", _STR),
        ]
    ),
    "QuarantineRecord": pa.schema(
        [
            ("id", _STR), ("stage", _STR), ("reason", _STR), ("detail", _STR), ("record_id", _STR),
            ("key", _STR), ("parent_id", _STR), ("raw", _STR), ("payload", _STR), ("meta", _STR),
        ]
    ),
}

_IMG = {"_type": "Image"}
_VAL = {"dtype": "string", "_type": "Value"}


def _hf_features(schema: pa.Schema) -> dict[str, Any]:
    def feat(t: pa.DataType) -> Any:
        if t.equals(IMAGE_TYPE):
            return dict(_IMG)
        if pa.types.is_list(t):
            return {"feature": feat(t.value_type), "_type": "List"}
        if pa.types.is_struct(t):
            return {f.name: feat(f.type) for f in t}
        if pa.types.is_int8(t):
            return {"dtype": "int8", "_type": "Value"}
        return dict(_VAL)

    return {f.name: feat(f.type) for f in schema}


HF_FEATURES: dict[str, dict[str, Any]] = {k: _hf_features(s) for k, s in ARROW_SCHEMAS.items()}


def schema_for(record_type: str) -> pa.Schema:
    """Arrow schema with the Hugging Face features and cocoa's record type in its metadata."""
    if record_type not in ARROW_SCHEMAS:
        raise RecordError(f"unknown record type {record_type!r}; known: {', '.join(ARROW_SCHEMAS)}")
    meta = {
        b"huggingface": json.dumps({"info": {"features": HF_FEATURES[record_type]}}).encode(),
        b"cocoa": json.dumps({"record_type": record_type, "schema_version": SCHEMA_VERSION}).encode(),
    }
    return ARROW_SCHEMAS[record_type].with_metadata(meta)


def payload_json(record: BaseModel) -> str:
    """A record as JSON for quarantine/reject payloads: image bytes replaced by their digest."""

    def strip(v: Any) -> Any:
        if isinstance(v, dict):
            if set(v) == {"bytes", "path"}:
                b = v["bytes"]
                return {"digest": digest(b) if b is not None else None, "path": v["path"]}
            return {k: strip(x) for k, x in v.items()}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    return canonical_json(strip(record.model_dump()))


def to_row(record: BaseModel) -> dict[str, Any]:
    """A record as a dict matching its Arrow schema (``meta`` serialised to JSON)."""
    row = record.model_dump()
    if "meta" in row:
        row["meta"] = canonical_json(row["meta"])
    return row


def from_row(record_type: str, row: dict[str, Any], where: str = "") -> _WithId:
    """Validate an Arrow row back into its record model; errors name ``where`` (file and row)."""
    cls = RECORD_TYPES[record_type]
    row = dict(row)
    if isinstance(row.get("meta"), str):
        try:
            row["meta"] = json.loads(row["meta"]) if row["meta"] else {}
        except json.JSONDecodeError as e:
            raise RecordError(f"{where}: column 'meta' is not valid JSON ({e})") from None
    elif row.get("meta") is None and "meta" in cls.model_fields:
        row["meta"] = {}
    try:
        return cls.model_validate(row)
    except Exception as e:
        raise RecordError(f"{where}: invalid {record_type}: {_pydantic_msg(e)}") from None


def validate_record(record_type: str, data: dict[str, Any], where: str = "") -> _WithId:
    """Validate user-provided data (e.g. JSON) as a record, with an error naming ``where``."""
    cls = RECORD_TYPES.get(record_type)
    if cls is None:
        raise RecordError(f"unknown record type {record_type!r}; known: {', '.join(RECORD_TYPES)}")
    try:
        return cls.model_validate(data)
    except Exception as e:
        raise RecordError(f"{where or 'record'}: invalid {record_type}: {_pydantic_msg(e)}") from None


def _pydantic_msg(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        parts = []
        for err in errors()[:5]:
            loc = ".".join(str(x) for x in err.get("loc", ())) or "record"
            msg = err.get("msg", "")
            if err.get("type") == "extra_forbidden":
                msg = "unknown field (remove it or check its spelling)"
            parts.append(f"{loc}: {msg}")
        return "; ".join(parts)
    return str(e)
