"""Rejected rows as ``QuarantineRecord`` rows (``stage="curate"``), written without building a model per row:
the payload of a SynthRecord computed from its Arrow columns, and whole Arrow tables of rejects. Ids come
from :func:`cocoa.records.quarantine_id`, so the id format lives in ``cocoa.records`` only."""

from __future__ import annotations

import json
from json.encoder import encode_basestring as _enc
from typing import Any

from ..records import canonical_json, digest, quarantine_id


def _quarantine_row(reason: str, detail: str, row: dict[str, Any], payload: str, meta: dict[str, Any]) -> dict[str, Any]:
    """A ``QuarantineRecord`` row (same id and layout as ``to_row(QuarantineRecord(...))``, without
    building the pydantic model per row)."""
    record_id, key = row.get("id") or "", row.get("key") or ""
    return {
        "id": quarantine_id("curate", reason, record_id, key, ""),
        "stage": "curate",
        "reason": reason,
        "detail": detail or "",
        "record_id": record_id,
        "key": key,
        "parent_id": row.get("parent_id") or "",
        "raw": "",
        "payload": payload,
        "meta": canonical_json(meta),
    }


def synth_payload(row: dict[str, Any]) -> str:
    """``payload_json(SynthRecord)`` computed from its Arrow row (image bytes -> digest)."""
    out = dict(row)
    img = out.get("image")
    if img is not None:
        out["image"] = {"digest": digest(img["bytes"]) if img.get("bytes") is not None else None,
                        "path": img.get("path")}
    m = out.get("meta")
    out["meta"] = json.loads(m) if m else {}
    return canonical_json(out)


def _js(v: Any) -> str:
    """A JSON scalar exactly as ``canonical_json`` writes it."""
    if v is None:
        return "null"
    if v.__class__ is str:
        return _enc(v)
    return canonical_json(v)


def synth_payloads(tab) -> list[str]:  # type: ignore[no-untyped-def]
    """:func:`synth_payload` for every row of an Arrow table of SynthRecords, column-wise (no per-row dicts)."""
    c = {name: tab.column(name).to_pylist() for name in
         ("answer", "caption", "id", "key", "kind", "meta", "params_hash", "parent_id", "question", "source")}
    img = tab.column("image")
    import pyarrow.compute as pc

    img_b = pc.struct_field(img, "bytes").to_pylist()
    img_p = pc.struct_field(img, "path").to_pylist()
    teacher = tab.column("teacher").to_pylist()
    template = tab.column("template").to_pylist()
    out = []
    js = _js
    dig: dict[bytes, str] = {}
    for (ans, cap, id_, key, kind, m, ph, par, q, src), b, p, t, tp in zip(
        zip(c["answer"], c["caption"], c["id"], c["key"], c["kind"], c["meta"], c["params_hash"], c["parent_id"],
            c["question"], c["source"]),
        img_b, img_p, teacher, template,
    ):
        if not m or m == "{}":
            meta = "{}"
        else:
            try:
                meta = canonical_json(json.loads(m))
            except ValueError:  # an invalid_record row: keep what was stored, as a JSON string
                meta = js(m)
        if b is None:
            d = "null"
        else:
            d = dig.get(b)
            if d is None:
                d = dig[b] = '"' + digest(b) + '"'
        out.append(
            f'{{"answer":{js(ans)},"caption":{js(cap)},"id":{js(id_)},"image":{{"digest":{d},"path":{js(p)}}},'
            f'"key":{js(key)},"kind":{js(kind)},"meta":{meta},"params_hash":{js(ph)},"parent_id":{js(par)},'
            f'"question":{js(q)},"source":{js(src)},'
            + ('"teacher":null,' if t is None else
               f'"teacher":{{"backend":{js(t["backend"])},"model":{js(t["model"])},"revision":{js(t["revision"])}}},')
            + ('"template":null}' if tp is None else f'"template":{{"hash":{js(tp["hash"])},"name":{js(tp["name"])}}}}}')
        )
    return out


def quarantine_table(reasons: list[str], details: list[str], record_ids: list[str], keys: list[str],
                     parents: list[str], payloads: list[str], metas: list[str]):  # type: ignore[no-untyped-def]
    """QuarantineRecord rows (stage "curate") as an Arrow table, ids as ``QuarantineRecord`` computes them."""
    import pyarrow as pa

    record_ids = [i or "" for i in record_ids]  # an invalid_record row may lack them
    keys = [k or "" for k in keys]
    parents = [p or "" for p in parents]
    ids = [quarantine_id("curate", r, i, k, "") for r, i, k in zip(reasons, record_ids, keys)]
    n = len(ids)
    return pa.table({
        "id": ids, "stage": ["curate"] * n, "reason": reasons, "detail": details, "record_id": record_ids,
        "key": keys, "parent_id": parents, "raw": [""] * n, "payload": payloads, "meta": metas,
    })
