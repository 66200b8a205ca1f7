"""Which records pre-training reads (a scenes benchmark root, a PairRecord dataset directory, or scenes
pairs generated in memory) and the key that names them in the cache without reading them."""

from __future__ import annotations

from pathlib import Path

from ...records import PairRecord, RecordError, canonical_json, digest
from .config import PretrainConfig


def _resolve_data(data: str | Path) -> Path:
    from ...shards import is_dataset

    d = Path(data)
    if is_dataset(d / "original"):
        return d / "original"
    if is_dataset(d):
        return d
    raise RecordError(f"{d} holds no PairRecord shards: expected {d}/original/manifest.json (a scenes benchmark "
                      "root from `cocoa-data scenes`) or a dataset directory with manifest.json")


def data_key(data: str | Path | None, config: PretrainConfig) -> str:
    """Identifies the training data for the cache without reading it: the shard checksums of the
    manifest, or (embedded default) the scenes generator's source and the number of pairs."""
    if data is None:
        from ...sources import scenes

        source = b"".join(p.read_bytes() for p in sorted(Path(scenes.__file__).parent.glob("*.py")))  # the package
        return digest(canonical_json(["scenes", config.scenes_train, 0, digest(source)]))
    from ...shards import read_manifest

    path = _resolve_data(data)
    m = read_manifest(path)
    if m.record_type != "PairRecord":
        raise RecordError(f"{path} holds {m.record_type} records; pre-training reads PairRecord shards (original/)")
    if not m.complete:
        raise RecordError(f"{path} is incomplete (its writer did not finish); regenerate it")
    return digest(canonical_json(["shards", [sh.sha256 for sh in m.shards]]))


def load_records(data: str | Path | None, config: PretrainConfig) -> tuple[list[PairRecord], Path | None]:
    """(records, image root): the PairRecords to pre-train on."""
    if data is None:
        from ...sources import scenes

        return list(scenes.iter_train_pairs(config.scenes_train, seed=0)), None
    from ...shards import open_dataset

    path = _resolve_data(data)
    data_key(data, config)  # validates the record type / completeness with a clear message
    return list(open_dataset(path, record_type="PairRecord")), path

