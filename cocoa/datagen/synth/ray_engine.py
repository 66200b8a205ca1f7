"""`cocoa-data synth --engine ray`: the teachers run as a Ray Data actor pool, on one machine or a cluster.

This process (the driver) does what the local engine does before and after generation: it reads and plans
the source pairs (:class:`~cocoa.datagen.synth.planner.Planner`, the same request keys, the same skips of
finished keys), copies the pairs to ``original/``, puts every request's image into the workspace's image
store (``OUT/images/``, written atomically), and writes the outcomes through the same atomic part writers
(temporary name, fsync, rename; the manifest, rewritten last, is the commit). In between, the planned
requests (key, task, prompt, the image's store path, the pair's context: no image bytes) flow through
``ray.data.from_items(...).map_batches(TeacherActor, compute=ActorPoolStrategy(size=--workers))``: each actor
builds its teacher once with the project's factory (:func:`cocoa.datagen.teachers.build_teacher`: the
scenes, vLLM, OpenAI-compatible or transformers teacher, exactly as the local engine would), reads the images
from the store, and runs the generate -> validate -> retry-with-a-new-seed loop of the local engine; the
driver turns each outcome into the same ``SynthRecord`` / ``QuarantineRecord`` rows the local engine writes.

So for a deterministic teacher the records equal the local engine's (same ids, same contents; only the
order of rows within the shards may differ), a killed driver loses at most the uncommitted outcomes, and
a rerun (either engine) skips every finished key. A dead actor is restarted and its in-flight batches are
retried on the new one (the run completes by itself); a batch whose actor dies ``1 + _BATCH_RETRIES`` times
stops the run with one line naming the rerun. Requires ``OUT`` on a filesystem every node sees (the
actors read the images from ``OUT/images``) and cocoa installed on every node.
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

from ...records import ImageRef, RecordError
from ..schemas import OutputError, json_schema, parse_output
from ..teachers.base import TeacherError, TeacherRequest, token_count
from .config import SynthConfig
from .outputs import bad_pair_quarantine, embedded_pair, quarantine_row, synth_rows
from .planner import Planned, attempt_seed
from .runner import Synthesizer, _storable
from .source import Source
from .summary import SynthIncomplete

_STORE_REL = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{64}\.[a-z]{3,4}$")
_OUTCOME_FIELDS = ("key", "status", "attempt", "raws", "error", "reason", "detail", "finish_reason",
                   "prompt_tokens", "completion_tokens")
#: default map_batches batch size per backend when --batch-size is unset (the teachers' own defaults)
_BATCH = {"vllm": 256, "openai": 64, "transformers": 8, "scenes": 64}
#: a dead teacher actor is restarted (as often as needed) and its in-flight batches retried on the new one, but a
#: batch is tried at most 1 + _BATCH_RETRIES times: a batch that kills its actor each time (the OOM killer, a
#: crash in native code) stops the run with one line instead of rebuilding the teacher forever (Ray Data's own
#: default is unbounded task retries)
_BATCH_RETRIES = 3


def _first_line(e: BaseException) -> str:
    """The error's class and the first clause of its message (Ray's run on for lines)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return f"{type(e).__name__}: {lines[0].split(': ')[0][:160]}" if lines else type(e).__name__


class RayEngineError(RecordError):
    """Ray is missing, or the cluster cannot run the teachers as asked; the message says what to do."""


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise RayEngineError("--engine ray needs Ray Data: pip install 'cocoa[ray]' (or 'ray[data]>=2.60')") from None
    return ray


class TeacherActor:
    """One teacher replica of the pool (a Ray Data callable class): built once per actor, asked in batches."""

    def __init__(self, config: dict[str, Any], store_dir: str) -> None:
        from ..teachers import build_teacher

        self.config = cfg = SynthConfig.model_validate(config)
        self.store = Path(store_dir)
        backend = cfg.resolved_backend()
        self.sampling = cfg.sampling(backend)
        self.max_retries = cfg.resolved_max_retries(backend)
        self.k = cfg.qa_per_image
        # the schemas' length limits (--caption-chars / --qa-chars), where this cocoa has them
        self.limits = {k: getattr(cfg, k) for k in ("caption_chars", "qa_chars") if hasattr(cfg, k)}
        self.schemas = {t: json_schema(t, self.k, **self.limits) for t in cfg.tasks}
        self.teacher = build_teacher(cfg)

    def _image(self, rel: str) -> bytes:
        if not _STORE_REL.match(rel):  # only the store's own names: nothing else is ever read
            raise RecordError(f"request image {rel!r} is not an image store name")
        f = (self.store / rel).resolve()
        if self.store.resolve() not in f.parents:
            raise RecordError(f"request image {rel!r} resolves outside the image store {self.store}")
        return f.read_bytes()

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        items = []
        for r in batch.to_pylist():
            items.append({**r, "data": self._image(r["image"]), "attempt": 0, "raws": [], "status": "", "error": "",
                          "reason": "", "detail": "", "finish_reason": "", "prompt_tokens": 0, "completion_tokens": 0})
        pending = items
        while pending:  # the local engine's loop: invalid output is retried with a new seed, then quarantined
            reqs = [TeacherRequest(
                key=it["key"], task=it["task"], prompt=it["prompt"], image=it["data"], schema=self.schemas[it["task"]],
                seed=attempt_seed(self.config.seed, it["key"], it["attempt"]), sampling=self.sampling,
                attempt=it["attempt"], k=self.k, context=json.loads(it["context"])) for it in pending]
            results = self.teacher.generate(reqs)
            if len(results) != len(reqs):
                raise TeacherError(f"the teacher returned {len(results)} results for {len(reqs)} requests")
            retry = []
            for it, r in zip(pending, results):
                r = _storable(r)
                it["prompt_tokens"] += token_count(r.prompt_tokens)
                it["completion_tokens"] += token_count(r.completion_tokens)
                if r.text is None:
                    it["status"] = "rejected" if r.error_kind == "rejected" else "unavailable"
                    it["error"] = r.error or ""
                    continue
                it["raws"].append(r.text)
                try:
                    parse_output(it["task"], r.text, self.k, **self.limits)
                    it["status"] = "ok"
                except OutputError as e:
                    if it["attempt"] < self.max_retries:
                        it["attempt"] += 1
                        retry.append(it)
                    else:
                        it.update(status="invalid", reason=e.reason, detail=e.detail,
                                  finish_reason=getattr(r, "finish_reason", None) or "")
            pending = retry
        schema = pa.schema([("key", pa.string()), ("status", pa.string()), ("attempt", pa.int64()),
                            ("raws", pa.list_(pa.string())), ("error", pa.string()), ("reason", pa.string()),
                            ("detail", pa.string()), ("finish_reason", pa.string()), ("prompt_tokens", pa.int64()),
                            ("completion_tokens", pa.int64())])
        return pa.Table.from_pylist([{f: it[f] for f in _OUTCOME_FIELDS} for it in items], schema=schema)


class RaySynthesizer(Synthesizer):
    """The synth run with the teachers in a Ray Data actor pool (see the module docstring)."""

    def __init__(self, config: SynthConfig, teacher: Any = None, console: Any = None) -> None:
        if teacher is not None:
            raise RayEngineError("--engine ray builds its teachers in the Ray actors from the settings; a teacher "
                                 "object cannot be passed (use the local engine for a teacher of your own)")
        super().__init__(config, console=console)
        self._plan: dict[str, Planned] = {}
        self._refs: dict[str, ImageRef] = {}
        self.ray_seconds = 0.0

    @property
    def teacher(self) -> Any:  # the driver never builds a teacher (a vLLM engine would load here)
        return None

    # -- planning in the driver, generation in the pool -------------------------------------------
    def _loop(self, source: Source, done: set[str], orig_done: set[str]) -> None:
        cfg, out, s = self.config, self._out, self.summary
        assert out is not None
        rows: list[dict[str, Any]] = []
        for kind, item in self.planner.plan(source, done, orig_done):
            if kind == "pair":
                s.pairs += 1
                pair, images = item
                if out.original is not None and images is not None and pair.id not in orig_done:
                    out.write_original(embedded_pair(pair, images))
                    orig_done.add(pair.id)
                    s.originals += 1
                self._bar.advance()
                if out.pending_orig >= cfg.commit_every:
                    out.commit()
            elif kind in ("bad_pair", "skip_pair"):
                s.pairs += 1
                s.bad_pairs += 1
                self._bar.advance()
                if kind == "bad_pair":
                    key, pair, errors = item
                    self._quarantine(bad_pair_quarantine(key, pair, errors), "image_unreadable")
            elif kind == "skip":
                s.requests += 1
                s.skipped += 1
            elif kind == "unreadable":
                s.requests += 1
                key, pair, role, err, task = item
                self._quarantine(quarantine_row(key, pair, "image_unreadable", err, "", {"role": role, "task": task},
                                                stage="source"), "image_unreadable")
            else:
                s.requests += 1
                p: Planned = item
                ref = out.store.put(p.image)  # the actors read it from the store; the rows refer to it
                assert ref.path is not None
                rows.append({"key": p.key, "task": p.task, "prompt": p.prompt, "image": ref.path.split("/", 2)[2],
                             "context": json.dumps({"meta": p.pair.meta, "role": p.role, "dataset": p.pair.source},
                                                   default=str)})
                p.image = b""  # the driver keeps the plan, not the image bytes
                self._plan[p.key] = p
                self._refs[p.key] = ref
            out.maybe_commit()
        out.commit()  # the copied pairs are durable before generation starts
        if rows:
            self._generate(rows)
        self._source_skips(source, done)

    def _generate(self, rows: list[dict[str, Any]]) -> None:
        ray = _import_ray()
        cfg, out = self.config, self._out
        assert out is not None
        started = self._connect(ray)
        try:
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False  # cocoa's own bar reports progress
            ctx.execution_options.preserve_order = False
            # batches small enough that every actor gets work, at most the backend's batch size
            bs = max(1, min(cfg.batch_size or _BATCH.get(self.backend, 64), -(-len(rows) // (2 * cfg.workers))))
            ds = ray.data.from_items(rows, override_num_blocks=max(1, min(-(-len(rows) // bs), 10_000)))
            gpus = self._gpus_per_actor(ray)
            with warnings.catch_warnings():
                # Ray 2.60 names no parameter for an actor's restarts and retries: they go through its
                # **ray_remote_args, which still apply them but warn that they will go (Ray 2.64)
                warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
                ds = ds.map_batches(TeacherActor, batch_size=bs, batch_format="pyarrow",
                                    fn_constructor_kwargs={"config": cfg.model_dump(mode="json"),
                                                           "store_dir": str(out.store.dir.resolve())},
                                    compute=ray.data.ActorPoolStrategy(size=cfg.workers), num_cpus=0.1,
                                    num_gpus=gpus, max_restarts=-1, max_task_retries=_BATCH_RETRIES)
            t0 = time.perf_counter()
            try:
                for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                    for o in batch.to_pylist():
                        self._judge(o)
                    out.maybe_commit()
                    self._update_bar()
            except ray.exceptions.RayActorError as e:
                raise RayEngineError(
                    f"--engine ray: a teacher actor died {1 + _BATCH_RETRIES} times running the same batch "
                    f"({_first_line(e)}); stopped. Finished work is committed; rerun the same command to continue "
                    "(if the node ran out of memory, lower --batch-size or --workers per node)") from None
            self.ray_seconds = time.perf_counter() - t0
            if hasattr(self.summary, "generate_seconds"):
                self.summary.generate_seconds += self.ray_seconds
        finally:
            if started:
                ray.shutdown()

    def _connect(self, ray: Any) -> bool:
        """Join ``--ray-address`` / ``$RAY_ADDRESS``, or start a local cluster; True when this run started it."""
        import logging

        logging.getLogger("ray.data").setLevel(logging.WARNING)  # cocoa's bar and summary report the run
        warnings.filterwarnings("ignore", module=r"ray\.data\..*")
        if ray.is_initialized():
            return False
        address = self.config.ray_address or os.environ.get("RAY_ADDRESS") or None
        try:
            if address:
                ray.init(address=address, log_to_driver=False, logging_level="ERROR")
                return True
            ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                     object_store_memory=512 * 2**20, logging_level="ERROR")
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise RayEngineError(f"--engine ray: cannot {'join the Ray cluster at ' + address if address else 'start a local Ray cluster'} "
                                 f"({str(e).splitlines()[0][:200]}); start one with `ray start --head` and pass "
                                 "--ray-address, or check the address") from None
        return True

    def _gpus_per_actor(self, ray: Any) -> float:
        cfg = self.config
        if cfg.ray_gpus is not None:
            want = cfg.ray_gpus
        elif self.backend == "vllm":
            want = float(cfg.vllm.tensor_parallel_size)
        elif self.backend == "transformers" and cfg.device.startswith("cuda"):
            want = 1.0
        else:
            want = 0.0
        have = float(ray.cluster_resources().get("GPU", 0))
        if want and cfg.ray_gpus is None and have == 0:
            return 0.0  # a CPU-only cluster (the tests, a laptop): the backend runs on CPUs
        if want * cfg.workers > have + 1e-9 and want:
            raise RayEngineError(f"--engine ray: {cfg.workers} workers x {want:g} GPUs need {want * cfg.workers:g} "
                                 f"GPUs but the cluster has {have:g}; lower --workers (or --ray-gpus)")
        return want

    # -- outcomes -> rows, as the local engine writes them ----------------------------------------
    def _judge(self, o: dict[str, Any]) -> None:
        s = self.summary
        p = self._plan.pop(o["key"])
        p.attempt, p.raws = int(o["attempt"]), list(o["raws"] or [])
        s.prompt_tokens += int(o["prompt_tokens"])
        s.completion_tokens += int(o["completion_tokens"])
        status = o["status"]
        if status == "ok":
            self._consecutive_unavailable = 0
            self._finish_ok(p, parse_output(p.task, p.raws[-1], self.k, **getattr(self, "limits", {})))
        elif status == "rejected":
            self._consecutive_unavailable = 0
            self._finish_quarantine(p, "rejected", o["error"] or "the backend rejected the request", o["error"] or "")
        elif status == "unavailable":
            s.unavailable += 1
            self._consecutive_unavailable += 1
            self._last_unavailable = o["error"] or "unknown error"
            if self._consecutive_unavailable >= self.config.max_unavailable:
                raise SynthIncomplete(
                    f"the {self.backend} teacher failed {self._consecutive_unavailable} requests in a row "
                    f"(last error: {self._last_unavailable}); stopped. Finished work is committed; check the "
                    "server and rerun the same command to continue")
        else:
            self._consecutive_unavailable = 0
            if o["finish_reason"] == "length":  # cut off by --max-tokens, not malformed by the model
                self._finish_quarantine(p, "truncated", f"the output reached --max-tokens {self.sampling.max_tokens} "
                                        f"before it was complete ({o['reason']}: {o['detail']}); raise --max-tokens or "
                                        "lower --caption-chars / --qa-chars", p.raws[-1])
            else:
                self._finish_quarantine(p, o["reason"], o["detail"], p.raws[-1] if p.raws else "")
        if status != "ok":
            self._refs.pop(p.key, None)

    def _finish_ok(self, p: Planned, out: Any) -> None:
        s = self.summary
        s.ok += 1
        if p.attempt:
            s.retried += 1
        self._images.add(p.image_digest)
        ref = self._refs.pop(p.key)
        rows = synth_rows(p, out, teacher=self.teacher_info(), params_hash=self.params_hash,
                          seed=attempt_seed(self.config.seed, p.key, p.attempt))
        assert self._out is not None
        self._out.write_rows([r.model_copy(update={"image": ref}) for r in rows], 0)
        s.records[p.task] += len(rows)


def run_synth_ray(config: SynthConfig, console: Any = None) -> Any:
    """Run (or resume) synthesis with ``--engine ray``; returns the summary."""
    return RaySynthesizer(config, console=console).run()
