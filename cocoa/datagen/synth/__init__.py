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
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from ...config import Config, ConfigError
from ...fs import exclusive_lock, has_content, is_locked, mark_owned, remove_owned_tree
from ...prompts import PromptLibrary, Template, clean_text, image_kind
from ...records import (
    ImageRef,
    PairRecord,
    QuarantineRecord,
    RecordError,
    SynthRecord,
    TemplateInfo,
    canonical_json,
    content_id,
    decode_image,
    digest,
)
from ...shards import (
    MANIFEST,
    Manifest,
    ShardDataset,
    ShardError,
    ShardInfo,
    ShardWriter,
    Workspace,
    atomic_write_json,
    is_dataset,
    open_dataset,
    read_manifest,
)
from ..schemas import TASKS, OutputError, json_schema, parse_output, schema_hash
from ..teachers.base import Sampling, Teacher, TeacherError, TeacherRequest, TeacherResult, checked_result, text_problem
from ...errors import CocoaError

KEY_VERSION = "cocoa-synth/1"
WRITER = "cocoa-data synth"
DEFAULT_TEACHER = "Qwen/Qwen2.5-VL-7B-Instruct"
SCENES_TEACHER = "cocoa/scenes-teacher"
VLLM_MAX_PIXELS = 1003520  # 1280 * 28 * 28: ~1280 visual tokens for Qwen2/2.5-VL
_HUGE = 1 << 60  # ShardWriter limits: this module decides when to commit (request boundaries)
#: Defaults of --max-tokens / --max-retries per backend. The transformers teacher runs on the local
#: device (often a CPU for a first try): 768 tokens x 3 attempts took 13 min for 24 requests there.
BACKEND_DEFAULTS: dict[str, dict[str, int]] = {
    "default": {"max_tokens": 768, "max_retries": 2},
    "transformers": {"max_tokens": 256, "max_retries": 1},
}
QUARANTINE_WARN_SHARE = 0.10  # a larger quarantined share of the finished requests is a warning


# =============================================================================================
# configuration
# =============================================================================================
class VllmOptions(Config):
    """Offline vLLM engine settings (``--vllm-*``)."""

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per model replica (tensor parallel)")
    max_model_len: int = Field(8192, ge=256, description="Context length the engine reserves")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Fraction of GPU memory vLLM may use")
    max_num_seqs: int | None = Field(None, ge=1, description="Max concurrent sequences (vLLM default if unset)")
    dtype: str = Field("auto", description="Model dtype (auto, bfloat16, float16)")
    mode: Literal["chat", "generate"] = Field(
        "chat", description="chat: LLM.chat with the model's chat template; generate: Qwen-VL prompt + multi_modal_data")
    enforce_eager: bool = Field(False, description="Disable CUDA graphs (slower, less memory)")


class SynthConfig(Config):
    """Settings of `cocoa-data synth` (YAML via --config, every field also a flag)."""

    source: Literal["scenes", "mmeb"] = Field("scenes", description="Source pairs: the embedded scenes or MMEB-train")
    out: str = Field("shards", description="Workspace root (writes original/, synthetic/, synthetic/quarantine/)")
    # sources
    scenes_dir: str | None = Field(None, description="A built scenes benchmark root (uses ROOT/original); default: "
                                   "OUT/original if another command wrote it, else generate --scenes-n pairs")
    scenes_n: int = Field(200, ge=1, description="Scene pairs to generate when no scenes dataset is given")
    scenes_seed: int = Field(0, description="Seed of the generated scene pairs")
    mmeb_dir: str | None = Field(None, description="Local MMEB-train snapshot (parquet + image zips); default: the hub")
    mmeb_split: Literal["original", "diverse_instruction"] = Field("original", description="MMEB-train instruction split")
    mmeb_image_dir: str | None = Field(None, description="Extracted MMEB-train images (instead of the zips)")
    subsets: list[str] = Field(default_factory=list, description="MMEB subsets, comma-separated (default: all)")
    max_per_subset: int | None = Field(None, ge=1, description="At most this many pairs per MMEB subset")
    limit: int | None = Field(None, ge=1, description="At most this many source pairs in total")
    # tasks and prompts
    tasks: list[Literal["caption", "qa"]] = Field(default_factory=lambda: ["caption", "qa"],
                                                 description="What to synthesise per image")
    qa_per_image: int = Field(3, ge=1, le=20, description="QA pairs asked for per image (k)")
    prompts: str | None = Field(None, description="Directory of *.j2 templates that add to / override the built-ins")
    # teacher
    backend: Literal["auto", "scenes", "vllm", "openai", "transformers"] = Field(
        "auto", description="Teacher backend (auto: scenes for --source scenes, vllm for mmeb)")
    model: str | None = Field(None, description=f"Teacher model id or directory (default {DEFAULT_TEACHER}; "
                              "the scenes teacher ignores it)")
    revision: str = Field("", description="Model revision recorded in keys and outputs")
    base_url: str | None = Field(None, description="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key (never logged)")
    concurrency: int = Field(16, ge=1, description="Concurrent HTTP requests (openai backend)")
    request_timeout: float = Field(300.0, gt=0, description="Seconds per HTTP request before it counts as failed")
    http_retries: int = Field(5, ge=0, description="Retries of a request on HTTP 429/5xx/timeouts (backoff)")
    structured: Literal["auto", "json_schema", "vllm", "none"] = Field(
        "auto", description="openai backend: how to ask for schema-constrained output (auto: response_format "
        "json_schema; vllm: vLLM's structured_outputs extra body too; none: rely on validation)")
    max_retries: int | None = Field(None, ge=0, description="Retries (new seed) of output that fails validation, then "
                                    "quarantine (default per backend: 2; transformers 1)")
    max_unavailable: int = Field(16, ge=1, description="Stop after this many requests in a row fail to be served")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling")
    max_tokens: int | None = Field(None, ge=1, description="Max new tokens per output (default per backend: 768; "
                                   "transformers 256, enough for a caption or 3 QA pairs and quick on a CPU; raise it "
                                   "for long captions or a larger --qa-per-image)")
    seed: int = Field(0, description="Base seed (per-request seeds derive from it and the request key)")
    min_pixels: int | None = Field(None, ge=1, description="Image min pixels for the processor (vllm/transformers)")
    max_pixels: int | None = Field(None, ge=1, description="Image max pixels for the processor (vllm: 1003520 if "
                                   "unset; transformers: the model's processor default)")
    device: str = Field("auto", description="transformers backend: cpu, cuda, cuda:1 or auto")
    dtype: str = Field("auto", description="transformers backend: float32, bfloat16, float16 or auto")
    batch_size: int | None = Field(None, ge=1, description="Requests per generate call (backend default if unset)")
    vllm: VllmOptions = Field(default_factory=VllmOptions)
    # work split and durability
    shard_index: int = Field(0, ge=0, description="This worker's index (0..num_shards-1)")
    num_shards: int = Field(1, ge=1, description="Number of workers splitting the work by request key")
    commit_every: int = Field(256, ge=1, description="Commit a shard after this many finished records")
    commit_seconds: float = Field(120.0, gt=0, description="...or after this many seconds")
    # modes
    dry_run: bool = Field(False, description="Render prompts and count requests; no generation, nothing written")
    show: int = Field(3, ge=0, description="Prompts to print in --dry-run")
    overwrite: bool = Field(False, description="Delete earlier synth output in OUT first")
    progress: bool = Field(True, description="Show a progress bar")

    @model_validator(mode="after")
    def _v(self) -> SynthConfig:
        if self.shard_index >= self.num_shards:
            raise ValueError(f"shard_index {self.shard_index} must be < num_shards {self.num_shards}")
        if not self.tasks:
            raise ValueError("tasks is empty; give caption, qa or both")
        return self

    def resolved_max_tokens(self, backend: str | None = None) -> int:
        if self.max_tokens is not None:
            return self.max_tokens
        return BACKEND_DEFAULTS.get(backend or self.resolved_backend(), BACKEND_DEFAULTS["default"])["max_tokens"]

    def resolved_max_retries(self, backend: str | None = None) -> int:
        if self.max_retries is not None:
            return self.max_retries
        return BACKEND_DEFAULTS.get(backend or self.resolved_backend(), BACKEND_DEFAULTS["default"])["max_retries"]

    def sampling(self, backend: str | None = None) -> Sampling:
        return Sampling(temperature=self.temperature, top_p=self.top_p, max_tokens=self.resolved_max_tokens(backend),
                        seed=self.seed)

    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        if self.source == "scenes":
            return "scenes"
        if vllm_available():
            return "vllm"
        raise ConfigError(
            "--source mmeb needs a teacher model and vLLM is not installed here (the default backend). "
            "Install it (`pip install vllm`), or use an OpenAI-compatible server: "
            "`--backend openai --base-url http://HOST:PORT/v1 --model NAME`, "
            "or a local model with transformers: `--backend transformers --model DIR`"
        )

    def resolved_model(self) -> str:
        backend = self.resolved_backend()
        if backend == "scenes":
            return SCENES_TEACHER
        if self.model:
            return self.model
        if backend == "transformers":
            raise ConfigError("--backend transformers needs --model (a model id or a local directory)")
        return DEFAULT_TEACHER

    def key_options(self, backend: str | None = None) -> dict[str, Any]:
        """Backend options that change what the model sees (part of each request key)."""
        backend = backend or self.resolved_backend()
        if backend == "vllm":
            return {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels or VLLM_MAX_PIXELS}
        if backend == "transformers":
            return {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels}
        return {}


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


# =============================================================================================
# keys, partitions and the parts layout
# =============================================================================================
def request_key(image_digest: str, prompt: str, template_hash: str, model: str, revision: str,
                params: dict[str, Any], schema: str, task: str) -> str:
    return content_id(KEY_VERSION, image_digest, prompt, template_hash, model, revision, params, schema, task)


def partition(key: str, num_shards: int) -> int:
    """The worker (0..n-1) owning a hex key: disjoint and complete for any n."""
    return int(key[:8], 16) % num_shards


def attempt_seed(base: int, key: str, attempt: int) -> int:
    return int(digest(f"{base}:{key}:{attempt}")[:8], 16) & 0x7FFFFFFF


def part_name(index: int, num_shards: int) -> str:
    return f"part-{index:05d}-of-{num_shards:05d}"


def _parse_part(name: str) -> tuple[int, int] | None:
    try:
        _, i, _, n = name.split("-")
        return int(i), int(n)
    except ValueError:
        return None


def list_parts(dataset_dir: Path) -> list[Path]:
    d = dataset_dir / "parts"
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and _parse_part(p.name) and is_dataset(p))


@contextlib.contextmanager
def _locked(dataset_dir: Path) -> Iterator[None]:
    dataset_dir.mkdir(parents=True, exist_ok=True)
    with open(dataset_dir / ".merge.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_ours(dataset_dir: Path) -> None:
    """Refuse to take over a dataset directory that another command wrote (it would be lost)."""
    if not is_dataset(dataset_dir):
        return
    m = read_manifest(dataset_dir)
    if m.provenance.get("writer") != WRITER and any(not s.file.startswith("parts/") for s in m.shards):
        raise ShardError(
            f"{dataset_dir} holds a dataset written by another command ({m.record_type}, {m.num_rows} rows); "
            "cocoa-data synth will not mix its output into it: pass --overwrite to replace it, or choose another --out"
        )


def merge_parts(dataset_dir: str | Path, record_type: str, num_shards: int,
                provenance: dict[str, Any] | None = None) -> Manifest:
    """(Re)write ``dataset_dir/manifest.json`` listing the shards of every part (under a file lock).

    ``complete`` is true only when the ``num_shards`` parts of the current split all exist and are
    complete. Parts of an earlier, different split are included (their committed rows are valid and their
    keys were skipped by the current workers) but do not decide completeness.
    """
    dataset_dir = Path(dataset_dir)
    with _locked(dataset_dir):
        _check_ours(dataset_dir)
        expected = {part_name(i, num_shards) for i in range(num_shards)}
        shards: list[ShardInfo] = []
        done: set[str] = set()
        prov: dict[str, Any] = {}
        for p in list_parts(dataset_dir):
            m = read_manifest(p)
            if m.record_type != record_type:
                raise ShardError(f"{p} holds {m.record_type} records, not {record_type}; remove it")
            shards += [ShardInfo(file=f"parts/{p.name}/{s.file}", num_rows=s.num_rows, bytes=s.bytes, sha256=s.sha256)
                       for s in m.shards]
            if m.complete:
                done.add(p.name)
            prov = prov or dict(m.provenance)
        old = read_manifest(dataset_dir) if is_dataset(dataset_dir) else None
        prov.update(provenance or {})
        prov.update({"writer": WRITER, "layout": "parts", "num_shards": num_shards,
                     "parts_complete": sorted(done & expected), "parts_missing": sorted(expected - done)})
        man = Manifest(
            record_type=record_type,
            num_rows=sum(s.num_rows for s in shards),
            complete=expected <= done,
            shards=shards,
            provenance=prov,
        )
        if old is not None:
            man.created = old.created
        atomic_write_json(dataset_dir / MANIFEST, man.model_dump())
        return man


def _load_column(dataset_dir: Path, column: str) -> set[str]:
    out: set[str] = set()
    for p in list_parts(dataset_dir):
        ds = ShardDataset(p, verify=False, allow_incomplete=True)
        out.update(x for x in ds.table([column]).column(column).to_pylist() if x)
    return out


# =============================================================================================
# sources
# =============================================================================================
@dataclass
class Source:
    name: str
    pairs: Iterable[PairRecord]
    total: int | None
    image_root: Path | None       # root for path-referenced images
    write_original: bool          # False when the input already is OUT/original
    describe: str
    report: Any = None            # rows the source skipped (bad images...), as QuarantineRecords
    images_checked: bool = False  # the reader already decoded every image (MMEB): no second decode


def _dataset_source(name: str, path: Path, ws: Workspace, limit: int | None) -> Source:
    # Source pairs are checked against their sha256 (flipped bytes must not reach the teacher or
    # original/): the read costs about as much as reading the pairs once, small against generation.
    ds = open_dataset(path, verify=True, record_type="PairRecord")
    total = len(ds) if limit is None else min(len(ds), limit)
    same = path.resolve() == ws.original.resolve()
    pairs: Iterable[PairRecord] = iter(ds)
    if limit is not None:
        pairs = itertools.islice(pairs, limit)
    return Source(name, pairs, total, path, not same, f"{name} pairs from {path}")


def open_source(config: SynthConfig, ws: Workspace) -> Source:
    if config.source == "scenes":
        if config.scenes_dir:
            root = Path(config.scenes_dir)
            if not root.is_dir():
                raise RecordError(f"--scenes-dir {root}: no such directory; build a scenes dataset with "
                                  "`cocoa-data scenes --out DIR` and pass that DIR")
            path = root / "original" if is_dataset(root / "original") else root
            if not is_dataset(path):
                raise RecordError(f"--scenes-dir {root}: no scenes dataset there (no original/manifest.json); "
                                  "build one with `cocoa-data scenes --out DIR`")
            return _dataset_source("scenes", path, ws, config.limit)
        if is_dataset(ws.original) and read_manifest(ws.original).provenance.get("writer") != WRITER:
            return _dataset_source("scenes", ws.original, ws, config.limit)
        from ...sources.scenes import iter_train_pairs

        n = config.scenes_n if config.limit is None else min(config.scenes_n, config.limit)
        return Source("scenes", iter_train_pairs(n, seed=config.scenes_seed), n, None, True,
                      f"{n} generated scene pairs (seed {config.scenes_seed})")
    return _mmeb_source(config)


def _mmeb_source(config: SynthConfig) -> Source:
    from ...sources import mmeb

    report = mmeb.SourceReport()
    src: str | Path = config.mmeb_dir or mmeb.TRAIN_REPO
    # validates its arguments now (before any output exists), rows come lazily
    pairs: Iterable[PairRecord] = mmeb.iter_mmeb_train(
        src, subsets=list(config.subsets) or None, split=config.mmeb_split, max_per_subset=config.max_per_subset,
        image_dir=config.mmeb_image_dir, report=report, source_flag="--mmeb-dir" if config.mmeb_dir else "",
        image_dir_flag="--mmeb-image-dir", split_flag="--mmeb-split")
    if config.limit is not None:
        pairs = itertools.islice(pairs, config.limit)
    total = _mmeb_row_estimate(config)
    return Source("mmeb", pairs, total, None, True, f"MMEB-train ({config.mmeb_split}) from {src}", report=report,
                  images_checked=True)


def _mmeb_row_estimate(config: SynthConfig) -> int | None:
    """Rows to expect (progress bar and ETA only), from parquet metadata of a local snapshot."""
    est = None
    if config.mmeb_dir and Path(config.mmeb_dir).is_dir():
        import pyarrow.parquet as pq

        root = Path(config.mmeb_dir)
        subsets = list(config.subsets) or sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        est = 0
        for sub in subsets:
            files = sorted((root / sub).glob(f"{config.mmeb_split}-*.parquet")) or sorted((root / sub).glob("train-*.parquet"))
            n = 0
            for f in files:
                with contextlib.suppress(Exception):
                    n += pq.ParquetFile(f).metadata.num_rows
            est += min(n, config.max_per_subset) if config.max_per_subset is not None else n
    if config.limit is not None:
        est = config.limit if est is None else min(est, config.limit)
    return est


# =============================================================================================
# the run
# =============================================================================================
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


@dataclass
class SynthSummary:
    out: Path
    pairs: int = 0
    requests: int = 0             # requests of this worker's partition
    skipped: int = 0              # already done by an earlier run
    ok: int = 0                   # requests with valid output
    retried: int = 0              # requests that needed more than one attempt
    quarantined: int = 0
    unavailable: int = 0          # not served (transport); left for a rerun
    records: Counter = field(default_factory=Counter)   # SynthRecords written by kind
    reasons: Counter = field(default_factory=Counter)   # quarantine reasons
    originals: int = 0
    bad_pairs: int = 0            # source pairs whose image cannot be read/decoded: quarantined, not in original/
    source_skipped: Counter = field(default_factory=Counter)  # rows the source reader set aside, by reason
    prompt_tokens: int = 0
    completion_tokens: int = 0
    images: int = 0
    seconds: float = 0.0
    complete: bool = False
    dry_run: bool = False
    examples: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "examples"}
        d["out"] = str(self.out)
        d["records"], d["reasons"] = dict(self.records), dict(self.reasons)
        d["source_skipped"] = dict(self.source_skipped)
        return d

    @property
    def usable_pairs(self) -> int:
        return self.pairs - self.bad_pairs

    def top_reasons(self, n: int = 5) -> str:
        c = self.reasons + Counter({f"source:{k}": v for k, v in self.source_skipped.items()
                                    if f"source:{k}" not in self.reasons})
        return ", ".join(f"{k} {v}" for k, v in c.most_common(n)) or "-"

    def quarantine_warning(self, share: float = QUARANTINE_WARN_SHARE) -> str | None:
        """A one-line warning when more than ``share`` of this run's finished work was quarantined."""
        done = self.ok + self.quarantined
        if not self.quarantined or self.quarantined <= share * done:
            return None
        return (f"{self.quarantined} of {done} finished items ({100 * self.quarantined / done:.0f}%) were quarantined; "
                f"top reasons: {self.top_reasons()}. The rows and their reasons are in "
                f"{Workspace(self.out).quarantine}")


class SynthIncomplete(CocoaError):
    """The run stopped with work left (server unavailable); committed work is kept, rerun to finish."""


class SynthEmpty(CocoaError):
    """The run finished but the source gave no usable pair: nothing to train on (a failure, not a success)."""


class Synthesizer:
    def __init__(self, config: SynthConfig, teacher: Teacher | None = None, console: Any = None) -> None:
        self.config = config
        self.ws = Workspace(config.out)
        self.lib = PromptLibrary(config.prompts)
        if teacher is None and config.dry_run and config.backend == "auto" and config.source == "mmeb" \
                and not vllm_available():
            config = config.model_copy(update={"backend": "vllm"})  # preview the default teacher's keys
            self.config = config
        self.backend = teacher.backend if teacher is not None else config.resolved_backend()
        self.model = teacher.model if teacher is not None else config.resolved_model()
        self.revision = teacher.revision if teacher is not None else config.revision
        self.sampling = config.sampling(self.backend)
        self.max_retries = config.resolved_max_retries(self.backend)
        self.params = {**self.sampling.as_dict(), **config.key_options(self.backend)}
        self.params_hash = digest(canonical_json(self.params))[:16]
        self.k = config.qa_per_image
        self.schemas = {t: json_schema(t, self.k) for t in config.tasks}
        self.schema_hashes = {t: schema_hash(t, self.k) for t in config.tasks}
        self.schema_text = {t: json.dumps(s, separators=(",", ":")) for t, s in self.schemas.items()}
        # every template this run may select renders now: a bad one fails before any output exists
        self.lib.check(list(config.tasks), k=self.k, schemas=self.schema_text)
        self._teacher = teacher
        self.console = console
        self.part = part_name(config.shard_index, config.num_shards)
        self.summary = SynthSummary(out=self.ws.root, dry_run=config.dry_run)

    # -- identity of this configuration ---------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        templates = {n: self.lib.get(n).hash for n in self.lib.names() if n.split("_")[0] in self.config.tasks}
        return {"key_version": KEY_VERSION, "source": self.config.source, "model": self.model,
                "revision": self.revision, "params": self.params, "tasks": sorted(self.config.tasks),
                "qa_per_image": self.k, "schemas": self.schema_hashes, "templates": templates}

    def _check_fingerprint(self, fp: dict[str, Any]) -> None:
        for d in (self.ws.synthetic, self.ws.quarantine):
            for p in list_parts(d):
                old = read_manifest(p).provenance.get("fingerprint")
                if old is not None and old != fp:
                    diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
                    raise ShardError(
                        f"{p} was written with different settings ({', '.join(diff)} differ). Outputs of different "
                        "teachers/templates/sampling would mix: pass --overwrite to start over, or choose another --out"
                    )

    # -- planning (runs in a background thread) ---------------------------------------------------
    def _plan(self, source: Source, done: set[str], orig_done: set[str] | None = None) -> Iterator[tuple[str, Any]]:
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

    @staticmethod
    def _prefetch(it: Iterator[Any], depth: int) -> Iterator[Any]:
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

    # -- dry run ----------------------------------------------------------------------------------
    def dry_run(self) -> SynthSummary:
        s = self.summary
        source = open_source(self.config, self.ws)
        done = self._done_keys()
        for kind, item in self._plan(source, done):
            if kind in ("pair", "bad_pair", "skip_pair"):
                s.pairs += 1
                if kind != "pair":
                    s.bad_pairs += 1
                    s.reasons["image_unreadable"] += kind == "bad_pair"
            elif kind == "skip":
                s.requests += 1
                s.skipped += 1
            elif kind == "request":
                s.requests += 1
                if len(s.examples) < self.config.show:
                    s.examples.append({"key": item.key, "task": item.task, "kind": item.kind, "role": item.role,
                                       "source": item.pair.source, "template": f"{item.template.name} ({item.template.hash})",
                                       "prompt": item.prompt})
            elif kind == "unreadable":
                s.requests += 1
                s.reasons["image_unreadable"] += 1
        return s

    def _done_keys(self) -> set[str]:
        return _load_column(self.ws.synthetic, "key") | _load_column(self.ws.quarantine, "key")

    # -- the real run -----------------------------------------------------------------------------
    def lock_name(self) -> str:
        return f".cocoa-synth-{self.part}.lock"

    def run(self) -> SynthSummary:
        if self.config.dry_run:
            return self.dry_run()
        t0 = time.time()
        source = open_source(self.config, self.ws)  # every input is checked here, before anything is created
        root = self.ws.root
        if root.exists() and not root.is_dir():
            raise RecordError(f"--out {root} is a file, not a directory; choose a directory for the workspace")
        fresh = not root.exists() or (root.is_dir() and not root.is_symlink() and not has_content(root))
        # One writer per part: a second `synth` on the same --out and part fails at once; other parts
        # (--shard-index) have their own lock and run concurrently. The kernel drops it on death.
        with exclusive_lock(root, name=self.lock_name(),
                            what=f"it runs `cocoa-data synth` on the same part ({self.part});"):
            if fresh:
                mark_owned(root, "workspace")
            return self._run_locked(source, t0)

    def _run_locked(self, source: Source, t0: float) -> SynthSummary:
        cfg = self.config
        self._prepare(source)
        fp = self.fingerprint()
        self._check_fingerprint(fp)
        done = self._done_keys()
        orig_done = _load_column(self.ws.original, "id") if source.write_original else set()
        self._load_teacher()  # before touching any output: a teacher that cannot start changes nothing
        prov = {"writer": WRITER, "fingerprint": fp, "teacher": self.teacher_info(), "part": self.part,
                "source": source.describe}
        self.synth_w = ShardWriter(self.ws.synthetic / "parts" / self.part, "SynthRecord", mode="append",
                                   max_rows=_HUGE, max_bytes=_HUGE, provenance=prov)
        self.quar_w = ShardWriter(self.ws.quarantine / "parts" / self.part, "QuarantineRecord", mode="append",
                                  max_rows=_HUGE, max_bytes=_HUGE, provenance=prov)
        self.orig_w = (ShardWriter(self.ws.original / "parts" / self.part, "PairRecord", mode="append",
                                   max_rows=_HUGE, max_bytes=_HUGE,
                                   provenance={"writer": WRITER, "source": source.describe, "part": self.part})
                       if source.write_original else None)
        self._open = True
        self._merge_all(source)  # aggregates now say complete: false until this run finishes
        self._pending_rows = 0
        self._pending_orig = 0
        self._pending_bytes = 0
        self._last_commit = time.time()
        self._consecutive_unavailable = 0
        self._last_unavailable = ""
        self._images: set[str] = set()
        finished = False
        try:
            with self._progress(source.total) as bar:
                self._bar = bar
                self._loop(source, done, orig_done)
            finished = True
        finally:
            self._commit()
            self._open = False
            self.summary.seconds = time.time() - t0
            self.summary.images = len(self._images)
            complete = finished and self.summary.unavailable == 0
            for w in (self.synth_w, self.quar_w, self.orig_w):
                if w is None:
                    continue
                if complete:
                    w.close()
                else:
                    w.abort()
            self._merge_all(source)
            self.summary.complete = complete and self._aggregate_complete(source)
            if self._teacher is not None:
                self._teacher.close()
        if self.summary.unavailable:
            raise SynthIncomplete(
                f"{self.summary.unavailable} request(s) could not be served by the {self.backend} teacher "
                f"(last error: {self._last_unavailable}). Everything finished is committed; rerun the same "
                "command to retry the rest (outputs stay marked incomplete until then)"
            )
        if source.report is not None:
            self.summary.source_skipped = Counter(source.report.skipped)
        if self.summary.usable_pairs <= 0:
            s = self.summary
            raise SynthEmpty(
                f"no usable source pairs: {s.pairs} read from {source.describe}"
                + (f", {s.bad_pairs} with an unreadable image" if s.bad_pairs else "")
                + (f", {sum(s.source_skipped.values())} row(s) set aside by the reader" if s.source_skipped else "")
                + f" (top reasons: {s.top_reasons()}). Nothing to train on; the rows and their reasons are in "
                f"{self.ws.quarantine}. Fix the source (missing image zips? wrong --mmeb-dir / --mmeb-image-dir / "
                "--scenes-dir?) and rerun"
            )
        return self.summary

    def teacher_info(self) -> dict[str, str]:
        return {"backend": self.backend, "model": self.model, "revision": self.revision}

    def _load_teacher(self) -> Teacher:
        return self.teacher

    @property
    def teacher(self) -> Teacher:
        if self._teacher is None:
            from ..teachers import build_teacher

            self._teacher = build_teacher(self.config)
        return self._teacher

    def _prepare(self, source: Source) -> None:
        cfg = self.config
        dirs = [self.ws.synthetic] + ([self.ws.original] if source.write_original else [])
        if cfg.overwrite:
            if cfg.num_shards > 1:
                raise ConfigError(
                    "--overwrite with --num-shards > 1 would let workers delete each other's output; remove "
                    f"{self.ws.synthetic} (and {self.ws.original}) once before starting the workers")
            busy = [f.name for f in sorted(self.ws.root.glob(".cocoa-synth-part-*.lock"))
                    if f.name != self.lock_name() and is_locked(self.ws.root, name=f.name)]
            if busy:
                raise ConfigError(f"--overwrite: other `cocoa-data synth` workers are writing {self.ws.root} "
                                  f"({', '.join(b.removeprefix('.cocoa-synth-').removesuffix('.lock') for b in busy)}); "
                                  "wait for them to finish or stop them first")
            for d in dirs:
                remove_owned_tree(d, flag="--overwrite")  # only cocoa's own datasets (or empty dirs)
        for d in dirs:
            _check_ours(d)
        if source.write_original and is_dataset(self.ws.original):
            old = read_manifest(self.ws.original).provenance.get("source")
            if old and old != source.describe:
                raise ShardError(f"{self.ws.original} holds pairs of another source ({old}); pass --overwrite "
                                 "or choose another --out")

    def _merge_all(self, source: Source) -> None:
        n = self.config.num_shards
        merge_parts(self.ws.synthetic, "SynthRecord", n, {"teacher": self.teacher_info()})
        merge_parts(self.ws.quarantine, "QuarantineRecord", n, {"teacher": self.teacher_info()})
        if source.write_original:
            merge_parts(self.ws.original, "PairRecord", n, {"source": source.describe})

    def _aggregate_complete(self, source: Source) -> bool:
        dirs = [self.ws.synthetic, self.ws.quarantine] + ([self.ws.original] if source.write_original else [])
        return all(read_manifest(d).complete for d in dirs)

    def _loop(self, source: Source, done: set[str], orig_done: set[str]) -> None:
        cfg = self.config
        bs = cfg.batch_size or self.teacher.batch_size
        work: list[Planned] = []
        s = self.summary
        for kind, item in self._prefetch(self._plan(source, done, orig_done), depth=4 * bs):
            if kind == "pair":
                s.pairs += 1
                pair, images = item
                if self.orig_w is not None and images is not None and pair.id not in orig_done:
                    self.orig_w.write(_embedded(pair, images))
                    orig_done.add(pair.id)
                    s.originals += 1
                    self._pending_orig += 1
                self._bar.advance()
                if self._pending_orig >= cfg.commit_every:
                    self._commit()
            elif kind in ("bad_pair", "skip_pair"):  # an image that cannot be decoded: quarantine, not original/
                s.pairs += 1
                s.bad_pairs += 1
                self._bar.advance()
                if kind == "bad_pair":
                    key, pair, errors = item
                    detail = "; ".join(f"{role} image: {err}" for role, err in errors.items())
                    self._quarantine_row(key, pair, "image_unreadable", f"pair not copied to original/: {detail}", "",
                                         {"roles": sorted(errors)}, stage="source",
                                         payload=canonical_json({"id": pair.id, "source": pair.source,
                                                                 "qry_text": pair.qry_text, "pos_text": pair.pos_text}))
            elif kind == "skip":
                s.requests += 1
                s.skipped += 1
            elif kind == "unreadable":
                s.requests += 1
                key, pair, role, err, task = item
                self._quarantine_row(key, pair, "image_unreadable", err, "", {"role": role, "task": task}, stage="source")
            else:
                s.requests += 1
                work.append(item)
                if len(work) >= bs:
                    work = self._run_batch(work[:bs]) + work[bs:]
            self._maybe_commit()
        while work:
            work = self._run_batch(work[:bs]) + work[bs:]
            self._maybe_commit()
        self._source_skips(source, done)

    def _source_skips(self, source: Source, done: set[str]) -> None:
        """Rows the source reader skipped (missing/corrupt images, bad rows): quarantined, never dropped."""
        if source.report is None:
            return
        cfg = self.config
        for q in source.report.quarantine:
            key = digest(f"source:{q.key}")
            if partition(key, cfg.num_shards) != cfg.shard_index or key in done:
                continue
            done.add(key)
            self.quar_w.write(QuarantineRecord(**{**q.model_dump(exclude={"id"}), "key": key,
                                                   "meta": {**q.meta, "source_key": q.key}}))
            self.summary.quarantined += 1
            self.summary.reasons[f"source:{q.reason}"] += 1
            self._pending_rows += 1

    def _run_batch(self, batch: list[Planned]) -> list[Planned]:
        """Generate one batch; returns the requests to retry (new attempt, new seed)."""
        cfg = self.config
        reqs = [TeacherRequest(
            key=p.key, task=p.task, prompt=p.prompt, image=p.image, schema=self.schemas[p.task],
            seed=attempt_seed(cfg.seed, p.key, p.attempt), sampling=self.sampling, attempt=p.attempt, k=self.k,
            context={"meta": p.pair.meta, "role": p.role, "dataset": p.pair.source},
        ) for p in batch]
        results = self.teacher.generate(reqs)
        if len(results) != len(reqs):
            raise TeacherError(f"the {self.backend} teacher returned {len(results)} results for {len(reqs)} requests")
        # whatever the teacher (a user's own included): text that cannot be stored as UTF-8 is a rejected
        # answer with its reason, never a crash of the quarantine writer
        results = [_storable(r) for r in results]
        retry: list[Planned] = []
        for p, r in zip(batch, results):
            s = self.summary
            s.prompt_tokens += r.prompt_tokens
            s.completion_tokens += r.completion_tokens
            if r.text is None:
                if r.error_kind == "rejected":
                    self._consecutive_unavailable = 0
                    self._finish_quarantine(p, "rejected", r.error or "the backend rejected the request", r.error or "")
                else:
                    s.unavailable += 1
                    self._consecutive_unavailable += 1
                    self._last_unavailable = r.error or "unknown error"
                    if self._consecutive_unavailable >= cfg.max_unavailable:
                        raise SynthIncomplete(
                            f"the {self.backend} teacher failed {self._consecutive_unavailable} requests in a row "
                            f"(last error: {self._last_unavailable}); stopped. Finished work is committed; check the "
                            "server and rerun the same command to continue")
                continue
            self._consecutive_unavailable = 0
            p.raws.append(r.text)
            try:
                out = parse_output(p.task, r.text, self.k)
            except OutputError as e:
                if p.attempt < self.max_retries:
                    p.attempt += 1
                    retry.append(p)
                else:
                    self._finish_quarantine(p, e.reason, e.detail, r.text)
                continue
            self._finish_ok(p, out)
        self._update_bar()
        return retry

    # -- outputs ------------------------------------------------------------------------------------
    def _finish_ok(self, p: Planned, out: Any) -> None:
        s = self.summary
        s.ok += 1
        if p.attempt:
            s.retried += 1
        self._images.add(p.image_digest)
        base = dict(parent_id=p.pair.id, source=p.pair.source, image=ImageRef(bytes=p.image), kind=p.task,
                    teacher=self.teacher_info(), template=TemplateInfo(name=p.template.name, hash=p.template.hash),
                    params_hash=self.params_hash, key=p.key)
        meta = {"role": p.role, "image_kind": p.kind, "attempts": p.attempt + 1, "image_digest": p.image_digest,
                "seed": attempt_seed(self.config.seed, p.key, p.attempt)}
        ref = p.pair.qry_image if p.role == "query" else p.pair.pos_image
        if ref is not None and ref.path:
            meta["image_path"] = ref.path
        if p.task == "caption":
            rows = [SynthRecord(caption=out.caption, meta=meta, **base)]
        else:
            rows = [SynthRecord(question=qa.question, answer=qa.answer, meta={**meta, "qa_index": j}, **base)
                    for j, qa in enumerate(out.qa)]
        for r in rows:
            self.synth_w.write(r)
            s.records[p.task] += 1
        self._pending_rows += len(rows)
        self._pending_bytes += len(p.image) * len(rows)

    def _finish_quarantine(self, p: Planned, reason: str, detail: str, raw: str) -> None:
        if p.attempt:
            self.summary.retried += 1
        self._images.add(p.image_digest)
        meta = {"role": p.role, "task": p.task, "image_kind": p.kind, "attempts": len(p.raws) or p.attempt + 1,
                "raws": [x[:8000] for x in p.raws], "template": {"name": p.template.name, "hash": p.template.hash},
                "teacher": self.teacher_info(), "params_hash": self.params_hash, "image_digest": p.image_digest}
        payload = canonical_json({"task": p.task, "prompt": p.prompt, "image_digest": p.image_digest,
                                  "template": p.template.name, "params": self.params})
        self._quarantine_row(p.key, p.pair, reason, detail, raw, meta, payload=payload)

    def _quarantine_row(self, key: str, pair: PairRecord, reason: str, detail: str, raw: str, meta: dict[str, Any],
                        stage: str = "synth", payload: str = "") -> None:
        self.quar_w.write(QuarantineRecord(stage=stage, reason=reason, detail=detail[:4000], record_id=pair.id, key=key,
                                           parent_id=pair.id, raw=raw, payload=payload, meta=meta))
        self.summary.quarantined += 1
        self.summary.reasons[reason] += 1
        self._pending_rows += 1

    def _maybe_commit(self) -> None:
        if (self._pending_rows >= self.config.commit_every or self._pending_bytes >= (256 << 20)
                or (self._pending_rows and time.time() - self._last_commit >= self.config.commit_seconds)):
            self._commit()

    def _commit(self) -> None:
        """Make every finished request durable (one shard per writer with pending rows)."""
        if not getattr(self, "_open", False):
            return
        for w in (self.synth_w, self.quar_w, self.orig_w):
            if w is not None:
                w.flush()
        self._pending_rows = self._pending_orig = self._pending_bytes = 0
        self._last_commit = time.time()

    # -- progress -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _progress(self, total: int | None) -> Iterator[Any]:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        from ...progress import Progress  # a live bar on a terminal, plain periodic lines in logs and pipes

        self._t_start = time.time()
        prog = Progress(
            TextColumn("[bold]synth[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("pairs"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}"),
            console=self.console, disable=not self.config.progress, refresh_per_second=2, transient=False,
        )
        with prog:
            tid = prog.add_task(f"{self.backend}:{self.model}", total=total, stats="")

            class Bar:
                def advance(_self) -> None:  # noqa: N805
                    prog.advance(tid)

                def update(_self, stats: str) -> None:  # noqa: N805
                    prog.update(tid, stats=stats)

            yield Bar()

    def _update_bar(self) -> None:
        s = self.summary
        dt = max(time.time() - self._t_start, 1e-6)
        self._bar.update(
            f"{len(self._images) / dt:.2f} img/s  {s.completion_tokens / dt:.0f} tok/s  ok {s.ok}  "
            f"retried {s.retried}  quarantined {s.quarantined}" + (f"  unavailable {s.unavailable}" if s.unavailable else "")
        )


def _embedded(pair: PairRecord, images: dict[str, tuple[bytes | None, str]]) -> PairRecord:
    """The pair with path-referenced images embedded (their paths are relative to another root), from
    the bytes already read (and checked) while planning."""
    upd = {}
    for name, role in (("qry_image", "query"), ("pos_image", "positive"), ("neg_image", "negative")):
        ref = getattr(pair, name)
        if ref is not None and ref.bytes is None:
            upd[name] = ImageRef(bytes=images[role][0])
    return pair.model_copy(update=upd) if upd else pair


def run_synth(config: SynthConfig, teacher: Teacher | None = None, console: Any = None) -> SynthSummary:
    """Run (or resume) synthesis as configured; returns a summary. See the module docstring."""
    return Synthesizer(config, teacher=teacher, console=console).run()


__all__ = [
    "SynthConfig", "VllmOptions", "Synthesizer", "SynthSummary", "SynthIncomplete", "SynthEmpty", "run_synth", "request_key",
    "partition", "part_name", "merge_parts", "list_parts", "TASKS",
]


def _storable(r: TeacherResult) -> TeacherResult:
    if r.text is None:
        return r
    if not isinstance(r.text, str):
        return TeacherResult(r.key, None, error=f"the teacher returned {type(r.text).__name__}, not text",
                             error_kind="rejected", prompt_tokens=r.prompt_tokens,
                             completion_tokens=r.completion_tokens)
    if text_problem(r.text):
        return checked_result(r.key, r.text, prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens)
    return r
