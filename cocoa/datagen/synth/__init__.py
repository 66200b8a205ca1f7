"""`cocoa-data synth`: teacher synthesis of fine-grained captions and QA, resumable and kill-safe.

Flow::

    source PairRecords ──► original/            (PairRecord, the source pairs)
          │ one request per (unique image, task)
          ▼
    prompt (Jinja) + image ─► teacher.generate ─► validate (pydantic schema)
          ├─ valid ─────────► synthetic/            (SynthRecord: one per caption / per QA pair)
          ├─ invalid ─► retry with a new seed (bounded) ─► synthetic/quarantine/ (raw text + reason)
          └─ server unavailable after bounded retries ─► not written; the run ends incomplete

**Request key.** ``key = hash(image bytes, rendered prompt, template hash, model id, revision, sampling
params + backend options, output schema, task)``. Identical work has the same key and is never done twice.

**Layout and resumability.** Each worker ``i`` of ``n`` (``--shard-index i --num-shards n``) owns the
requests with ``int(key[:8], 16) % n == i`` (and the source pairs with ``int(id[:8], 16) % n == i``) and
writes them to its own part directories with :class:`cocoa.shards.ShardWriter` in append mode::

    OUT/synthetic/parts/part-00000-of-00001/              SynthRecord shards of worker 0
    OUT/synthetic/quarantine/parts/part-00000-of-00001/   its QuarantineRecords
    OUT/original/parts/part-00000-of-00001/               its source pairs
    OUT/synthetic/manifest.json                           aggregate: every part's shards (complete when all are)

Finished requests are committed in small atomic shards (``--commit-every`` records); a request's rows
(one caption, or all its QA pairs) always land in the same shard. A restart skips every key already in
``synthetic/`` or ``quarantine/`` (any part), so a killed run resumes where it stopped. Each directory's
aggregate manifest is rewritten (atomically, under a file lock) when a worker starts (``complete: false``)
and when it finishes; it says ``complete: true`` only when every part of the current split is complete,
so readers (:func:`cocoa.shards.open_dataset`) refuse the data of a killed or partial run.

Modules: :mod:`.config` (the settings), :mod:`.source` (the source pairs), :mod:`.planner` (pairs ->
keyed requests, the work split), :mod:`.outputs` (parts, aggregate manifests, resume sets, output rows,
the commit policy), :mod:`.summary` (what a run did), :mod:`.runner` (the :class:`Synthesizer` loop).
"""

from ..schemas import TASKS
from .config import (
    BACKEND_DEFAULTS,
    DEFAULT_TEACHER,
    SCENES_TEACHER,
    VLLM_MAX_PIXELS,
    WRITER,
    SynthConfig,
    VllmOptions,
    vllm_available,
)
from .outputs import PartWriters, list_parts, merge_parts, part_name
from .planner import KEY_VERSION, Planned, Planner, attempt_seed, partition, request_key
from .runner import Synthesizer, run_synth
from .source import Source, open_source
from .summary import QUARANTINE_WARN_SHARE, SynthEmpty, SynthIncomplete, SynthSummary

__all__ = [
    "SynthConfig", "VllmOptions", "Synthesizer", "SynthSummary", "SynthIncomplete", "SynthEmpty", "run_synth", "request_key",
    "partition", "part_name", "merge_parts", "list_parts", "TASKS",
]
