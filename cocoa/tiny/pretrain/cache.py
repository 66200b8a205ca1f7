"""The cache of pre-trained models: one build per data, settings and base model, under
``$COCOA_CACHE/pretrained/``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...records import RecordError, canonical_json, digest
from .config import DEFAULT_STEPS, PRETRAIN_VERSION, PretrainConfig, trained_settings
from .data import data_key, load_records


def _model_key(path: Path) -> str:
    files = [path / "config.json", path / "model.safetensors"]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise RecordError(f"--base {path} is not a saved model ({missing[0].name} missing); "
                          "pass a directory written by save_pretrained / cocoa-train tiny-model")
    from ...shards import sha256_file

    return digest(canonical_json([sha256_file(f) for f in files]))


def cache_key(config: PretrainConfig, data_key: str) -> str:
    base_key = _model_key(Path(config.base)) if config.base else "tiny"
    return digest(canonical_json([PRETRAIN_VERSION, trained_settings(config), data_key, base_key]))[:16]


def pretrained_tiny_dir(data_dir: str | Path | None = None, steps: int = DEFAULT_STEPS, seed: int = 0,
                        *, console: Any = None, **settings: Any) -> Path:
    """The generatively pre-trained tiny model for this data and these settings, built once and cached
    under ``$COCOA_CACHE/pretrained/`` (keyed by the data manifest checksums + settings + base model).

    ``data_dir=None`` pre-trains on scenes training pairs generated in memory (the embedded default).
    Other keyword arguments are :class:`PretrainConfig` fields (``batch_size``, ``lr``, ``base``...)."""
    from ..build import cache_root, cached_build, settings_key

    config = PretrainConfig.build({"data": str(data_dir) if data_dir is not None else None, "steps": steps,
                                   "seed": seed, **settings})
    dkey = data_key(config.data, config)
    if config.base is None:
        # the random-init base enters the key through the tiny builder's own settings key
        key = cache_key(config, dkey + ":" + settings_key(config.arch, seed=config.seed))
    else:
        key = cache_key(config, dkey)
    final = cache_root() / "pretrained" / f"tiny-{config.arch}-gen-{key}"

    def build(d: Path) -> Path:
        # looked up on the package at call time, as before the split: a caller (the cache test) that
        # replaces cocoa.tiny.pretrain.pretrain is honoured
        from .. import pretrain as package

        records, root = load_records(config.data, config)
        return package.pretrain(config, d, records=records, image_root=root, dkey=dkey, console=console)

    return cached_build(final, build)
