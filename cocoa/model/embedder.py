"""``cocoa.Embedder``: encode texts and/or images with a saved cocoa model, pooled as in training.

    from cocoa import Embedder
    emb = Embedder.from_pretrained("runs/demo/stage3/model")
    e = emb.encode(texts=["a red cube left of a blue ball"], images=[pil_image],
                   instruction="Represent the given image with the caption")   # [1, D], unit norm

Inputs go through the same :class:`cocoa.model.collate.EmbedCollator` and
:meth:`cocoa.model.wrapper.CocoaModel.embed` as training (EOS appended, pooled and normalised as
``cocoa.json`` says). Batches are formed from inputs of similar length (fewer pad tokens); results come
back in input order. The evaluator (:func:`cocoa.eval.evaluate`) encodes through this class.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..records import ImageRef, RecordError
from .spec import SPEC_FILE, EmbeddingSpec

PATCH_PIXELS = 28 * 28  # Qwen2-VL: one LLM token per 2x2 merged 14-px patches


@dataclass(frozen=True)
class LazyImage:
    """An image loaded only when its batch is encoded: an :class:`ImageRef` under a data root."""

    ref: ImageRef
    root: Path | None = None
    size: tuple[int, int] | None = None  # (w, h) if known, for length estimates
    reader: Callable[[str], bytes] | None = None  # reads ``ref.path`` when the image is not under ``root``

    def load(self) -> Any:
        if self.reader is not None and self.ref.bytes is None and self.ref.path is not None:
            from ..records import decode_image

            return decode_image(self.reader(self.ref.path), name=self.ref.path)
        return self.ref.load(self.root)


def _image_size(image: Any) -> tuple[int, int] | None:
    if isinstance(image, LazyImage):
        return image.size
    size = getattr(image, "size", None)
    return tuple(size) if isinstance(size, tuple) else None  # type: ignore[return-value]


def estimate_length(spec: EmbeddingSpec, text: str, image: Any) -> int:
    """Rough token count of an input (text ~3 chars/token; image tokens from its size clamped to the
    spec's min/max pixels, 28x28 px per token), used only to batch inputs of similar length together."""
    n = len(text) // 3 + 2
    if image is not None:
        size = _image_size(image)
        lo = spec.image_min_pixels or 56 * 56
        hi = spec.image_max_pixels or 28 * 28 * 1280
        px = size[0] * size[1] if size else hi
        n += int(min(max(px, lo), hi) // PATCH_PIXELS) + 2
    return n


def to_pil(image: Any, where: str = "image") -> Any:
    """PIL image from a PIL image, :class:`LazyImage`, :class:`ImageRef` (embedded), file path or bytes."""
    from PIL import Image

    from ..records import decode_image

    if image is None:
        return None
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, LazyImage):
        return image.load()
    if isinstance(image, ImageRef):
        return image.load(None)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(bytes(image), name=where)
    if isinstance(image, (str, Path)):
        p = Path(image)
        if p.is_dir():
            raise RecordError(f"{where}: {p} is a directory, not an image file; give the path of one image")
        if not p.is_file():
            raise RecordError(f"{where}: image file {p} does not exist")
        return decode_image(p.read_bytes(), name=str(p))
    raise RecordError(f"{where}: cannot use a {type(image).__name__} as an image (give a PIL image, a path or bytes)")


def resolve_spec(model_dir: str | Path, pooling: str | None = None, eos_token: str | None = None) -> EmbeddingSpec:
    """The model's ``cocoa.json``, with ``pooling``/``eos_token`` overrides; without the file the
    overrides are required (``pooling`` at least), else a clear error."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise RecordError(f"model directory {model_dir} does not exist; pass a directory saved by cocoa-train")
    if (model_dir / SPEC_FILE).is_file():
        spec = EmbeddingSpec.load(model_dir)
        upd: dict[str, Any] = {}
        if pooling:
            upd["pooling"] = pooling
        if eos_token:
            upd["eos_token"] = eos_token
            upd["eos_token_id"] = None  # re-resolved from the tokenizer
        _check_tokenizer_files(model_dir)
        return spec.model_copy(update=upd) if upd else spec
    if not pooling:
        EmbeddingSpec.load(model_dir)  # raises the error that names the file and the flags
    arch = "qwen2-vl"
    cfg = model_dir / "config.json"
    if cfg.is_file():
        import json

        try:
            mt = json.loads(cfg.read_bytes()).get("model_type", "")
        except (ValueError, AttributeError) as e:  # not JSON, not UTF-8, not an object
            raise RecordError(f"{cfg} is not a readable model config ({type(e).__name__}: {e}); it must be the UTF-8 "
                              "JSON config.json saved with the model -- restore or re-save the model directory") from None
        if mt == "qwen2_5_vl":
            arch = "qwen2.5-vl"
    kw: dict[str, Any] = {"arch": arch, "pooling": pooling}
    if eos_token:
        kw["eos_token"] = eos_token
    _check_tokenizer_files(model_dir)
    return EmbeddingSpec(**kw)


def _check_tokenizer_files(model_dir: Path) -> None:
    from .collate import missing_tokenizer_files

    missing = missing_tokenizer_files(model_dir)
    if missing:
        raise RecordError(missing)


def check_device(device: str | None) -> str:
    """The device to run on: ``auto`` (a GPU when there is one), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, checked
    against this machine; anything else, or a device it does not have, is a :class:`RecordError` naming it."""
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    d = str(device).strip()
    try:
        dev = torch.device(d)
    except (RuntimeError, ValueError):
        raise RecordError(f"--device {device!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return d
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise RecordError(f"--device {device!r}: this machine has no usable CUDA GPU; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= n:
            raise RecordError(f"--device {device!r}: this machine has {n} CUDA GPU(s), cuda:0..cuda:{n - 1}")
        return d
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise RecordError(f"--device {device!r}: MPS is not available on this machine; use --device cpu (or auto)")
        return d
    raise RecordError(f"--device {device!r}: cocoa runs on cpu, cuda, cuda:N or mps; use one of those (or auto)")


_pick_device = check_device


def _pick_dtype(dtype: str | None, device: str):  # type: ignore[no-untyped-def]
    import torch

    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise RecordError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


class Embedder:
    """A loaded cocoa embedding model. Build with :meth:`from_pretrained`."""

    def __init__(self, model: Any, collator: Any, spec: EmbeddingSpec, model_dir: str | Path | None = None,
                 device: str = "cpu") -> None:
        self.model = model
        self.collator = collator
        self.spec = spec
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.device = device
        self.calls = 0  # forward passes run (batches), for accounting and tests
        self.items_encoded = 0

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *, pooling: str | None = None, eos_token: str | None = None,
                        device: str | None = "auto", dtype: str | None = "auto") -> Embedder:
        """Load a model saved by cocoa (weights + processor + ``cocoa.json``).

        Without ``cocoa.json`` pass ``pooling`` (``eos``/``last``/``mean``) and, for EOS pooling, the
        ``eos_token`` the model was trained with.
        """
        from .collate import EmbedCollator
        from .wrapper import CocoaModel

        spec = resolve_spec(model_dir, pooling, eos_token)
        dev = _pick_device(device)
        model = CocoaModel.from_pretrained(model_dir, spec=spec, dtype=_pick_dtype(dtype, dev))
        model.to(dev)
        model.eval()
        collator = EmbedCollator(model.processor, model.spec)
        return cls(model, collator, model.spec, model_dir=model_dir, device=dev)

    def save(self, out_dir: str | Path) -> Path:
        """Write the model as :meth:`from_pretrained` reads it (HF weights, processor, ``cocoa.json``)."""
        return self.model.save_pretrained(out_dir)

    @property
    def dim(self) -> int:
        """Embedding size ``D`` (0 when the model does not say)."""
        cfg = getattr(self.model, "hf_config", None)
        cfg = getattr(cfg, "text_config", cfg)
        return int(getattr(cfg, "hidden_size", 0) or 0)

    # -- length estimate (for sorting into batches of similar length) ---------------------------
    def estimate_length(self, text: str, image: Any) -> int:
        return estimate_length(self.spec, text, image)

    # -- encoding ---------------------------------------------------------------------------------
    def _collate(self, items: Sequence[tuple[str, Any]], collator: Any = None,
                 index: Sequence[int] | None = None) -> dict[str, Any]:
        from .collate import check_image_size

        col = collator or self.collator
        pairs = []
        for j, (t, im) in enumerate(items):
            where = f"input {index[j] if index is not None else j}"
            col.check_text(t, f"{where} text")
            pil = to_pil(im, where=f"{where} ({t[:40]!r})")
            if pil is not None:
                check_image_size(getattr(pil, "size", None), f"{where} image")
            pairs.append((t, pil))
        return col(pairs)

    def _forward(self, batch: dict[str, Any]) -> np.ndarray:
        import torch

        batch = {k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in batch.items()}
        with torch.inference_mode():
            out = self.model.embed(batch)
        self.calls += 1
        out = torch.nn.functional.normalize(out.float(), dim=-1)  # exact unit norm in float32 (bf16 models)
        return out.cpu().numpy()

    def encode_items(self, items: Sequence[tuple[str, Any]], *, batch_size: int = 16, sort: bool = True,
                     lengths: Sequence[int] | None = None, progress: Any = None,
                     on_batch: Callable[[list[int], np.ndarray], None] | None = None,
                     instruction: str | None = None) -> np.ndarray:
        """Embed ``(text, image-or-None)`` items; returns float32 ``[N, D]`` in input order.

        Items are sorted by estimated length (longest first) and cut into batches; the next batch is
        prepared (images decoded, tokenised) on a background thread while the model runs.
        ``progress(n_done)`` is called after each batch; ``on_batch(indices, embeddings)`` too.
        ``instruction`` is prefixed to every text exactly as training's collator does it.
        """
        collator = self.collator
        if instruction:
            collator = copy.copy(self.collator)
            collator.instruction = instruction
        n = len(items)
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if lengths is None and sort:
            lengths = [self.estimate_length(t, im) for t, im in items]
        order = sorted(range(n), key=lambda i: -lengths[i]) if sort and lengths is not None else list(range(n))
        batches = [order[s:s + batch_size] for s in range(0, n, batch_size)]
        out: np.ndarray | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cocoa-collate") as pool:
            fut = pool.submit(self._collate, [items[i] for i in batches[0]], collator, batches[0])
            for b, idx in enumerate(batches):
                batch = fut.result()
                if b + 1 < len(batches):
                    fut = pool.submit(self._collate, [items[i] for i in batches[b + 1]], collator, batches[b + 1])
                emb = self._forward(batch)
                if out is None:
                    out = np.empty((n, emb.shape[1]), dtype=np.float32)
                out[idx] = emb
                self.items_encoded += len(idx)
                if on_batch is not None:
                    on_batch(idx, emb)
                if progress is not None:
                    progress(len(idx))
        assert out is not None
        return out

    def encode(self, texts: str | Sequence[str] | None = None, images: Any = None, *, instruction: str | None = None,
               batch_size: int = 16, return_tensors: str = "np", show_progress: bool = False):  # type: ignore[no-untyped-def]
        """L2-normalised embeddings ``[N, D]`` of texts, images, or (text, image) pairs.

        ``texts``: a string or a list; ``images``: a PIL image / path / bytes, or a list of them (``None``
        entries allowed). With both, the lists pair up item by item and must have equal length.
        ``instruction`` is prefixed to every text (image-only items get it as their text).
        ``return_tensors``: ``"np"`` (float32 numpy) or ``"pt"`` (torch tensor).
        """
        if return_tensors not in ("np", "pt"):
            raise ValueError(f"return_tensors must be 'np' or 'pt', not {return_tensors!r}")
        if isinstance(texts, (bytes, bytearray, memoryview)):
            raise ValueError("texts is bytes; decode it to a str (or give a list of str)")
        if isinstance(texts, str):
            texts = [texts]
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        if texts is None and images is None:
            raise ValueError("give texts, images, or both")
        if texts is not None and images is not None and len(texts) != len(images):
            raise ValueError(f"{len(texts)} texts but {len(images)} images: with both, they pair up one to one")
        n = len(texts) if texts is not None else len(images)  # type: ignore[arg-type]
        items: list[tuple[str, Any]] = []
        for i in range(n):
            t = texts[i] if texts is not None else ""
            im = images[i] if images is not None else None
            if not isinstance(t, str):
                raise ValueError(f"texts[{i}] is a {type(t).__name__}, not a string")
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"texts[{i}] is not valid Unicode text ({e.reason} at character {e.start}: "
                                 f"{t[e.start]!r}); fix or re-decode the string") from None
            if not t.strip() and im is None and not instruction:
                raise ValueError(f"input {i} is empty (no text and no image)")
            items.append((t, im))
        if show_progress:
            with encode_progress(n, "encoding") as advance:
                emb = self.encode_items(items, batch_size=batch_size, progress=advance, instruction=instruction)
        else:
            emb = self.encode_items(items, batch_size=batch_size, instruction=instruction)
        if return_tensors == "pt":
            import torch

            return torch.from_numpy(emb)
        return emb


class encode_progress:
    """A progress bar over inputs encoded (count, rate, elapsed, ETA) as a context manager yielding ``advance(n)``."""

    def __init__(self, total: int, description: str = "encoding", console: Any = None, disable: bool = False) -> None:
        from ..progress import counting

        self._c = counting(total, description, unit="inputs", console=console, disable=disable)

    def __enter__(self) -> Callable[[int], None]:
        return self._c.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._c.__exit__(*exc)


def image_header_size(data: bytes) -> tuple[int, int] | None:
    """(w, h) from an encoded image's header without decoding it; None when PIL cannot read the header
    (not an image, truncated, or a decompression bomb). Only used to sort inputs by length and to key the
    cache: a bad image is reported with its record when it is decoded for encoding."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except (OSError, ValueError, Image.DecompressionBombError):  # UnidentifiedImageError is an OSError
        return None
