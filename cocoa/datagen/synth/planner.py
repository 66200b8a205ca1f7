"""Source pairs -> requests: one per (unique image, task), each with its content key, owned by the worker
whose partition the key falls in; planned in a thread ahead of generation (:func:`prefetch`)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ...errors import CocoaError
from ...prompts import PromptLibrary, Template, clean_text, image_kind
from ...records import PairRecord, content_id, decode_image, digest
from .config import SynthConfig
from .source import Source

KEY_VERSION = "cocoa-synth/1"


def request_key(image_digest: str, prompt: str, template_hash: str, model: str, revision: str,
                params: dict[str, Any], schema: str, task: str) -> str:
    return content_id(KEY_VERSION, image_digest, prompt, template_hash, model, revision, params, schema, task)


def partition(key: str, num_shards: int) -> int:
    """The worker (0..n-1) owning a hex key: disjoint and complete for any n."""
    return int(key[:8], 16) % num_shards


def attempt_seed(base: int, key: str, attempt: int) -> int:
    return int(digest(f"{base}:{key}:{attempt}")[:8], 16) & 0x7FFFFFFF


@dataclass
class Planned:
    key: str
    task: str
    kind: str
    role: str
    pair: PairRecord
    image: bytes
    image_digest: str
    template: Template
    prompt: str
    attempt: int = 0
    raws: list[str] = field(default_factory=list)


class Planner:
    """Plans this worker's requests for a configuration: the prompt library, the teacher identity and
    the sampling parameters that go into every request key."""

    def __init__(self, config: SynthConfig, lib: PromptLibrary, model: str, revision: str, params: dict[str, Any],
                 schema_text: dict[str, str], schema_hashes: dict[str, str]) -> None:
        self.config, self.lib, self.model, self.revision, self.params = config, lib, model, revision, params
        self.k = config.qa_per_image
        self.schema_text, self.schema_hashes = schema_text, schema_hashes

    def plan(self, source: Source, done: set[str], orig_done: set[str] | None = None) -> Iterator[tuple[str, Any]]:
        """Yield, per source pair: ``("pair", pair)`` (to copy into original/ when this worker owns it),
        or ``("bad_pair", (key, pair, errors))`` when one of its images cannot be read or decoded (it goes
        to quarantine, never to original/), then its requests: ``("request", Planned)``, ``("skip", key)``
        (done earlier) or ``("unreadable", ...)``."""
        cfg = self.config
        seen: set[tuple[str, str]] = set()
        decoded: dict[str, str | None] = {}  # image digest -> decode error (None: decodes)

        def decode_error(data: bytes, d: str, name: str) -> str | None:
            if source.images_checked:
                return None
            if d not in decoded:
                try:
                    decode_image(data, name=name)
                    decoded[d] = None
                except CocoaError as e:
                    decoded[d] = str(e)
            return decoded[d]

        for pair in source.pairs:
            owns_pair = (source.write_original and partition(pair.id, cfg.num_shards) == cfg.shard_index
                         and (orig_done is None or pair.id not in orig_done))
            images: dict[str, tuple[bytes | None, str]] = {}
            for role, ref in (("query", pair.qry_image), ("positive", pair.pos_image), ("negative", pair.neg_image)):
                if ref is None:
                    continue
                try:
                    images[role] = (ref.read_bytes(source.image_root), "")
                except CocoaError as e:
                    images[role] = (None, str(e))
            requests: list[tuple[str, Any]] = []
            bad: dict[str, str] = {r: err for r, (data, err) in images.items() if data is None}
            for role in ("query", "positive"):
                if role not in images:
                    continue
                data, err = images[role]
                if data is None:
                    key = content_id(KEY_VERSION, "unreadable", pair.id, role)
                    if partition(key, cfg.num_shards) == cfg.shard_index:
                        requests.append(("skip", key) if key in done else ("unreadable", (key, pair, role, err, "")))
                    continue
                d = digest(data)
                kind = image_kind(pair.source, pair.meta)
                todo = []
                for task in cfg.tasks:
                    if (d, task) in seen:
                        continue
                    seen.add((d, task))
                    tpl = self.lib.select(task, kind)
                    prompt = self.lib.render(
                        tpl, dataset=pair.source, kind=kind, task=task, qry=clean_text(pair.qry_text),
                        pos_text=clean_text(pair.pos_text), role=role, k=self.k, schema=self.schema_text[task],
                    ).text
                    key = request_key(d, prompt, tpl.hash, self.model, self.revision, self.params,
                                      self.schema_hashes[task], task)
                    if partition(key, cfg.num_shards) != cfg.shard_index:
                        continue
                    if key in done:
                        requests.append(("skip", key))
                        continue
                    todo.append(Planned(key, task, kind, role, pair, data, d, tpl, prompt))
                if not todo and not owns_pair:
                    continue
                # only images this worker uses are decoded (a corrupt one would fail a whole batch)
                err = decode_error(data, d, f"{pair.source} record {pair.id} ({role} image)")
                if err is not None:
                    bad[role] = err
                    requests += [("unreadable", (p.key, pair, role, err, p.task)) for p in todo]
                    continue
                requests += [("request", p) for p in todo]
            if owns_pair and "negative" in images and "negative" not in bad:
                data = images["negative"][0]
                assert data is not None
                err = decode_error(data, digest(data), f"{pair.source} record {pair.id} (negative image)")
                if err is not None:
                    bad["negative"] = err
            if owns_pair and bad:
                key = content_id(KEY_VERSION, "bad-pair", pair.id)
                yield ("skip_pair", key) if key in done else ("bad_pair", (key, pair, bad))
            else:
                yield "pair", (pair, images if owns_pair else None)
            yield from requests


def prefetch(it: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run ``it`` in a thread (image reading, decoding checks, rendering) ahead of generation."""
    q: queue.Queue = queue.Queue(maxsize=max(2, depth))
    stop = threading.Event()
    END = object()

    def work() -> None:
        try:
            for x in it:
                while not stop.is_set():
                    try:
                        q.put(x, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(END)
        except BaseException as e:  # re-raised in the consumer
            q.put(("__error__", e))

    t = threading.Thread(target=work, name="synth-plan", daemon=True)
    t.start()
    try:
        while True:
            x = q.get()
            if x is END:
                return
            if isinstance(x, tuple) and len(x) == 2 and x[0] == "__error__":
                raise x[1]
            yield x
    finally:
        stop.set()
