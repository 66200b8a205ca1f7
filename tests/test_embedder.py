"""cocoa.Embedder on the offline tiny Qwen2-VL: shapes, norms, ordering, instruction, training's pooling."""

import shutil

import numpy as np
import pytest
from PIL import Image

TEXTS = ["a red cube", "two small blue spheres left of a large green cylinder", "yellow", "a purple cone above a cube"]


@pytest.fixture(scope="module")
def embedder(tiny_model_dir):
    from cocoa import Embedder

    return Embedder.from_pretrained(tiny_model_dir, device="cpu")


def _images():
    return [Image.new("RGB", (112, 112), (200, 30, 30)), Image.new("RGB", (56, 84), (30, 30, 200)), None, None]


def test_encode_shapes_norms_and_order(embedder):
    import torch

    e = embedder.encode(texts=TEXTS, batch_size=3)
    assert e.ndim == 2 and e.shape[0] == 4 and e.shape[1] >= 8
    assert e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    # batching sorts by length internally; results come back in input order and match one-by-one encoding
    single = np.concatenate([embedder.encode(texts=[t]) for t in TEXTS])
    np.testing.assert_allclose(e, single, atol=2e-5)
    assert not np.allclose(e[0], e[1])
    t = embedder.encode(texts="a red cube", return_tensors="pt")
    assert isinstance(t, torch.Tensor) and t.shape == (1, e.shape[1])
    np.testing.assert_allclose(t.numpy()[0], e[0], atol=2e-5)


def test_images_pairs_and_instruction(embedder, tmp_path):
    ims = _images()
    pairs = embedder.encode(texts=TEXTS, images=ims, batch_size=2)
    img_only = embedder.encode(images=ims[:2])
    assert pairs.shape[0] == 4 and img_only.shape[0] == 2
    np.testing.assert_allclose(np.linalg.norm(pairs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(pairs[2:], embedder.encode(texts=TEXTS[2:]), atol=2e-5)  # None image = text only
    assert not np.allclose(pairs[0], embedder.encode(texts=TEXTS[:1])[0])  # the image matters
    # paths and bytes work like PIL images
    p = tmp_path / "red.png"
    ims[0].save(p)
    np.testing.assert_allclose(embedder.encode(images=[str(p)]), img_only[:1], atol=2e-5)
    np.testing.assert_allclose(embedder.encode(images=[p.read_bytes()]), img_only[:1], atol=2e-5)
    # the instruction is prefixed exactly as training's collator does ("{instruction} {text}")
    instr = "Represent the caption"
    with_instr = embedder.encode(texts=TEXTS[:2], instruction=instr)
    np.testing.assert_allclose(with_instr, embedder.encode(texts=[f"{instr} {t}" for t in TEXTS[:2]]), atol=2e-5)
    assert not np.allclose(with_instr, embedder.encode(texts=TEXTS[:2]))


def test_same_pooling_as_training(embedder):
    """The Embedder's vectors are exactly CocoaModel.embed over an EmbedCollator batch (training's path)."""
    import torch

    from cocoa.model.collate import EmbedCollator

    col = EmbedCollator(embedder.model.processor, embedder.model.spec)
    items = list(zip(TEXTS, _images()))
    with torch.no_grad():
        ref = embedder.model.embed(col(items)).float()
    ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    np.testing.assert_allclose(embedder.encode(texts=TEXTS, images=_images()), ref, atol=2e-5)
    assert embedder.spec.pooling == "eos"


def test_bad_inputs(embedder, tiny_model_dir, tmp_path):
    from cocoa import Embedder
    from cocoa.records import RecordError

    with pytest.raises(ValueError, match="pair up"):
        embedder.encode(texts=TEXTS, images=_images()[:2])
    with pytest.raises(ValueError, match="empty"):
        embedder.encode(texts=["ok", "  "])
    with pytest.raises(ValueError, match="give texts, images"):
        embedder.encode()
    with pytest.raises(ValueError, match="return_tensors"):
        embedder.encode(texts=["x"], return_tensors="tf")
    with pytest.raises(RecordError, match="does not exist"):
        embedder.encode(images=[str(tmp_path / "nope.png")])
    with pytest.raises(RecordError, match="does not exist"):
        Embedder.from_pretrained(tmp_path / "missing")
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "cocoa.json").unlink()
    with pytest.raises(RecordError, match=r"no cocoa\.json.*--pooling"):
        Embedder.from_pretrained(bare)
    e = Embedder.from_pretrained(bare, pooling="eos", eos_token="<|endoftext|>", device="cpu")
    np.testing.assert_allclose(e.encode(texts=TEXTS[:2]), embedder.encode(texts=TEXTS[:2]), atol=2e-5)


def test_image_header_size_reads_headers_and_returns_none_for_non_images():
    import io

    from PIL import Image

    from cocoa.model.embedder import image_header_size

    buf = io.BytesIO()
    Image.new("RGB", (37, 21)).save(buf, format="PNG")
    assert image_header_size(buf.getvalue()) == (37, 21)
    assert image_header_size(b"not an image") is None
    assert image_header_size(b"") is None


def test_save_then_from_pretrained_gives_the_same_embeddings(embedder, tmp_path):
    from cocoa import Embedder

    out = embedder.save(tmp_path / "copy")
    again = Embedder.from_pretrained(out, device="cpu")
    assert again.spec == embedder.spec
    np.testing.assert_allclose(again.encode(texts=TEXTS), embedder.encode(texts=TEXTS), atol=1e-5)
