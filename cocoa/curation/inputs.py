"""Opening curate's and mix's input datasets: refuse a missing, empty or foreign-schema dataset,
checksum it for the provenance, and take rows of its table by index."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from ..records import schema_for
from ..shards import MANIFEST, ShardDataset, ShardError, open_dataset, read_manifest


def dataset_checksum(path: Path) -> dict[str, Any]:
    """Checksums of a dataset: its manifest file and the sha256 over its shards' sha256s.

    Reads the manifest only: callers have opened (and so checked) the dataset already.
    """
    m = read_manifest(path)
    content = hashlib.sha256("".join(s.sha256 for s in m.shards).encode()).hexdigest()
    return {
        "path": str(path),
        "record_type": m.record_type,
        "rows": m.num_rows,
        "manifest_sha256": hashlib.sha256((path / MANIFEST).read_bytes()).hexdigest(),
        "content_sha256": content,
    }


def open_checked(path: Path, record_type: str, what: str, hint: str | None = None) -> ShardDataset:
    """Open a dataset, refusing a missing/empty directory and shards whose schema does not match.

    ``hint`` says how to create the dataset (the command to run), for the missing/empty message.
    """
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        if hint is None:
            hint = ("`cocoa-data synth`" if record_type == "SynthRecord"
                    else "`cocoa-data scenes` or `cocoa-data synth --source mmeb`")
            hint = f"create it first ({hint})"
        raise ShardError(f"{path} is missing or empty: there is no {what} to read; {hint}")
    ds = open_dataset(path, record_type=record_type)
    want = schema_for(record_type)
    for f in ds.files:
        got = ds._open(f).schema
        missing = [n for n in want.names if n not in got.names]
        wrong = [n for n in want.names if n in got.names and not got.field(n).type.equals(want.field(n).type)]
        if missing or wrong:
            raise ShardError(
                f"{f} does not have the {record_type} schema (missing columns: {missing or 'none'}; "
                f"columns of another type: {wrong or 'none'}); it was not written by this cocoa version "
                "or is damaged: regenerate the dataset"
            )
    return ds

def pa_indices(idx: list[int] | np.ndarray):  # type: ignore[no-untyped-def]
    import pyarrow as pa

    return pa.array(np.asarray(idx, dtype=np.int64))
