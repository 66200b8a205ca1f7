"""On-disk embedding cache keyed by model hash + input hash.

Layout::

    CACHE/<model_hash>/model.json          what the hash covers (for humans)
    CACHE/<model_hash>/chunk-<id>.npy      embeddings, float32 [n, D] (memory-mapped when read)
    CACHE/<model_hash>/chunk-<id>.keys     their n input keys, one per line (written last)
    CACHE/filehash.json                    memo of big-file digests keyed by (path, size, mtime)

Each file is written whole to a hidden temporary file and renamed (:func:`_write_whole`), the
``.keys`` file after its ``.npy``: a chunk exists for readers only once both are complete, so a killed
run leaves only complete chunks and a rerun re-encodes only what was not yet written.

**Concurrent writers are safe by design, so there is no lock**: torchrun ranks, two ``cocoa-eval`` runs
(even in containers whose processes share a pid), or threads of one process can use one cache at once.
Chunks are never rewritten (unique names), every temporary file has a unique name (random, not the
pid), ``model.json`` holds the same content whoever writes it, and ``filehash.json`` is a memo (a lost
update only costs hashing a file again; an unreadable one is ignored). Two runs encoding the same input
at the same time both store it; the first chunk read wins (same model, same input: the same embedding up to float rounding). A chunk that
cannot be read is reported and ignored (its inputs are simply encoded again).

The **model hash** covers the weights, the model/tokenizer/processor configuration files and the
effective embedding spec (``cocoa.json`` after any ``--pooling``/``--eos-token`` override): anything
that changes an embedding changes the hash. The **input hash** covers the text (after any
instruction is applied) and the image's bytes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
import uuid
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from ..records import canonical_json, digest

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
CONFIG_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
# files in a model directory that do not influence embeddings
IGNORED_FILES = {"README.md", "training_args.bin", "trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"}
CACHE_VERSION = 1


def _write_whole(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one: the project's atomic
    writer, whose temporary name is unique (pid + random, created exclusively), so threads of one process
    and same-pid processes of different containers sharing the cache never touch each other's file."""
    from ..shards import atomic_write_bytes

    atomic_write_bytes(path, data)


def _write_json(path: Path, obj: Any) -> None:
    _write_whole(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def _cache_error(root: Path, e: OSError) -> Exception:
    from ..records import RecordError

    return RecordError(f"cannot write the embedding cache at {root} ({e.strerror or e}); free space or pass "
                       "--cache-dir DIR (a writable directory), or --no-cache. Chunks written before are complete "
                       "and reused by the next run")


def default_cache_dir() -> Path:
    return Path(os.environ.get("COCOA_CACHE", Path.home() / ".cache" / "cocoa")) / "embeddings"


def _file_digest(path: Path, memo: dict[str, Any] | None) -> str:
    """xxh3-128 of a file; memoised by (path, size, mtime, inode). Like git's "racy" rule, a memo entry
    is trusted only if it was recorded more than 2 s after the file's mtime (coarse mtimes cannot hide a
    same-size rewrite)."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    hit = memo.get(key) if memo is not None else None
    if isinstance(hit, dict) and hit.get("t", 0) > st.st_mtime + 2:
        return hit["d"]
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while b := f.read(1 << 24):
            h.update(b)
    d = h.hexdigest()
    if memo is not None:
        memo[key] = {"d": d, "t": time.time()}
    return d


# the cocoa.json fields that change an embedding (ids follow from the hashed tokenizer; stages, base_model
# and extra are provenance)
SPEC_KEYS = ("arch", "pooling", "eos_token", "attention", "normalize", "image_min_pixels", "image_max_pixels", "max_length")


def spec_key(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: spec.get(k) for k in SPEC_KEYS}


def model_fingerprint(model_dir: str | Path, spec: dict[str, Any], cache_dir: str | Path | None = None) -> tuple[str, dict[str, Any]]:
    """``(hash, what_it_covers)`` for a model directory and its effective embedding spec.

    Big weight files are hashed once and memoised (by path, size and mtime) under ``cache_dir``.
    """
    model_dir = Path(model_dir)
    memo_path = Path(cache_dir) / "filehash.json" if cache_dir is not None else None
    memo: dict[str, Any] = {}
    if memo_path is not None and memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_bytes())
        except (ValueError, OSError):  # torn, not JSON, not UTF-8: a memo only, so start afresh
            memo = {}
        if not isinstance(memo, dict):
            memo = {}
    before = dict(memo)
    files: dict[str, str] = {}
    for p in sorted(model_dir.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name in IGNORED_FILES or p.name == "cocoa.json":
            continue
        if p.suffix in WEIGHT_SUFFIXES or p.suffix in CONFIG_SUFFIXES:
            files[p.name] = _file_digest(p, memo if p.suffix in WEIGHT_SUFFIXES else None)
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in files):
        from ..records import RecordError

        raise RecordError(f"{model_dir} holds no weights file (*.safetensors / *.bin); point --model at a saved model directory")
    covered = {"version": CACHE_VERSION, "files": files, "spec": spec_key(spec)}
    if memo_path is not None and memo != before:
        try:
            _write_json(memo_path, memo)
        except OSError:  # read-only or full cache: the memo only saves time
            pass
    return digest(canonical_json(covered))[:32], covered


def input_key(text: str, image_digest: str | None) -> str:
    """The cache key of one encoder input: its text and the digest of its image bytes (or none)."""
    return digest(canonical_json([text, image_digest]))


class EmbeddingCache:
    """Embeddings of one model, looked up by input key. ``None`` root = a cache that stores nothing."""

    def __init__(self, root: str | Path | None, model_hash: str, covered: dict[str, Any] | None = None) -> None:
        self.root = Path(root) / model_hash if root is not None else None
        self.model_hash = model_hash
        self._index: dict[str, tuple[int, int]] = {}  # key -> (chunk no, row)
        self._chunks: list[np.ndarray] = []
        self._seen: set[str] = set()
        if self.root is not None:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                if covered is not None and not (self.root / "model.json").is_file():
                    _write_json(self.root / "model.json", covered)
            except OSError as e:
                raise _cache_error(self.root, e) from None
            self.refresh()

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def refresh(self) -> None:
        """Load chunks written since the last look (by this or another process)."""
        if self.root is None:
            return
        for p in sorted(self.root.glob("chunk-*.keys")):
            if p.name in self._seen:
                continue
            self._seen.add(p.name)
            npy = p.with_suffix(".npy")
            try:
                keys = p.read_text().split()
                emb = np.load(npy, mmap_mode="r", allow_pickle=False)
                if emb.ndim != 2 or len(keys) != emb.shape[0] or emb.dtype != np.float32:
                    raise ValueError(f"{len(keys)} keys for embeddings of shape {emb.shape} ({emb.dtype})")
            except Exception as e:  # a damaged chunk only costs re-encoding its inputs
                warnings.warn(f"embedding cache chunk {npy} is unreadable ({e}); ignoring it (delete it and its .keys "
                              "file to silence this)", stacklevel=2)
                continue
            ci = len(self._chunks)
            self._chunks.append(emb)
            for i, k in enumerate(keys):
                self._index.setdefault(k, (ci, i))

    def keys(self) -> list[str]:
        return list(self._index)

    def missing(self, keys: Iterable[str]) -> list[str]:
        return [k for k in keys if k not in self._index]

    def get(self, keys: Sequence[str]) -> np.ndarray:
        """Stacked embeddings of ``keys`` (all must be present)."""
        if not keys:
            dim = self._chunks[0].shape[1] if self._chunks else 0
            return np.zeros((0, dim), dtype=np.float32)
        return np.stack([self._chunks[c][i] for c, i in (self._index[k] for k in keys)]).astype(np.float32, copy=False)

    def put(self, keys: Sequence[str], emb: np.ndarray, persist: bool = True) -> None:
        """Add embeddings (memory always; disk as one atomic chunk when the cache has a root and ``persist``)."""
        emb = np.asarray(emb, dtype=np.float32)
        if len(keys) != emb.shape[0]:
            raise ValueError(f"{len(keys)} keys for {emb.shape[0]} embeddings")
        if not len(keys):
            return
        if self.root is not None and persist:
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(emb), allow_pickle=False)
            name = f"chunk-{uuid.uuid4().hex}"
            try:
                _write_whole(self.root / f"{name}.npy", buf.getvalue())
                _write_whole(self.root / f"{name}.keys", ("\n".join(keys) + "\n").encode())  # last: commits it
            except OSError as e:  # full disk, read-only cache: chunks already written stay valid
                with contextlib.suppress(OSError):
                    (self.root / f"{name}.npy").unlink()
                raise _cache_error(self.root, e) from None
            self._seen.add(f"{name}.keys")
        ci = len(self._chunks)
        self._chunks.append(emb)
        for i, k in enumerate(keys):
            self._index.setdefault(k, (ci, i))
