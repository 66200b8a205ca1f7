"""The synth run (:class:`Synthesizer`): plan requests ahead in a thread, ask the teacher in batches,
retry invalid output with a new seed, write ok rows and quarantine rows, commit, and summarise."""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from ...fs import exclusive_lock, has_content, mark_owned
from ...prompts import PromptLibrary
from ...records import QuarantineRecord, RecordError, canonical_json, digest
from ...shards import Workspace
from ..schemas import OutputError, json_schema, parse_output, schema_hash
from ..teachers.base import (Teacher, TeacherError, TeacherRequest, TeacherResult, checked_result, text_problem,
                             token_count)
from .config import WRITER, SynthConfig, vllm_available
from .outputs import (
    PartWriters,
    aggregate_complete,
    bad_pair_quarantine,
    check_fingerprint,
    done_keys,
    embedded_pair,
    merge_all,
    original_ids,
    part_name,
    prepare,
    quarantine_row,
    request_quarantine,
    source_quarantine,
    synth_rows,
)
from .planner import KEY_VERSION, Planned, Planner, attempt_seed, partition, prefetch
from .source import Source, open_source
from .summary import SynthEmpty, SynthIncomplete, SynthSummary


class Synthesizer:
    """One worker's synthesis run as configured (see :mod:`cocoa.datagen.synth`)."""

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
        self.limits = {"caption_chars": config.caption_chars, "qa_chars": config.qa_chars}  # the schemas' maxLength
        self.schemas = {t: json_schema(t, self.k, **self.limits) for t in config.tasks}
        self.schema_hashes = {t: schema_hash(t, self.k, **self.limits) for t in config.tasks}
        self.schema_text = {t: json.dumps(s, separators=(",", ":")) for t, s in self.schemas.items()}
        # every template this run may select renders now: a bad one fails before any output exists
        self.lib.check(list(config.tasks), k=self.k, schemas=self.schema_text)
        self.planner = Planner(config, self.lib, self.model, self.revision, self.params, self.schema_text,
                               self.schema_hashes)
        self._teacher = teacher
        self.console = console
        self.part = part_name(config.shard_index, config.num_shards)
        self.summary = SynthSummary(out=self.ws.root, dry_run=config.dry_run)
        # the state of the run, while it writes
        self._out: PartWriters | None = None     # this worker's part writers and commit policy
        self._bar: Any = None                     # the progress bar
        self._t_start = 0.0                       # when the bar started (for the rates it shows)
        self._images: set[str] = set()            # digests of the images with finished requests
        self._consecutive_unavailable = 0         # requests in a row the teacher failed to serve
        self._last_unavailable = ""               # the last such failure

    # -- identity of this configuration ---------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        templates = {n: self.lib.get(n).hash for n in self.lib.names() if n.split("_")[0] in self.config.tasks}
        return {"key_version": KEY_VERSION, "source": self.config.source, "model": self.model,
                "revision": self.revision, "params": self.params, "tasks": sorted(self.config.tasks),
                "qa_per_image": self.k, "schemas": self.schema_hashes, "templates": templates}

    # -- dry run ----------------------------------------------------------------------------------
    def dry_run(self) -> SynthSummary:
        s = self.summary
        source = open_source(self.config, self.ws)
        done = done_keys(self.ws)
        for kind, item in self.planner.plan(source, done):
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
        prepare(self.ws, source, cfg, self.lock_name())
        fp = self.fingerprint()
        check_fingerprint(self.ws, fp)
        done = done_keys(self.ws)
        orig_done = original_ids(self.ws) if source.write_original else set()
        _ = self.teacher  # built before touching any output: a teacher that cannot start changes nothing
        prov = {"writer": WRITER, "fingerprint": fp, "teacher": self.teacher_info(), "part": self.part,
                "source": source.describe}
        out = self._out = PartWriters(
            self.ws, self.part, prov,
            {"writer": WRITER, "source": source.describe, "part": self.part} if source.write_original else None,
            cfg.commit_every, cfg.commit_seconds)
        merge_all(self.ws, source, cfg.num_shards, self.teacher_info())  # aggregates say complete: false until the end
        finished = False
        try:
            with self._progress(source.total) as bar:
                self._bar = bar
                self._loop(source, done, orig_done)
            finished = True
        finally:
            out.commit()
            self.summary.seconds = time.time() - t0
            self.summary.images = len(self._images)
            complete = finished and self.summary.unavailable == 0
            out.close(complete)
            merge_all(self.ws, source, cfg.num_shards, self.teacher_info())
            self.summary.complete = complete and aggregate_complete(self.ws, source)
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

    @property
    def teacher(self) -> Teacher:
        if self._teacher is None:
            from ..teachers import build_teacher

            self._teacher = build_teacher(self.config)
        return self._teacher

    def _loop(self, source: Source, done: set[str], orig_done: set[str]) -> None:
        cfg = self.config
        out = self._out
        assert out is not None
        bs = cfg.batch_size or self.teacher.batch_size
        work: list[Planned] = []
        s = self.summary
        for kind, item in prefetch(self.planner.plan(source, done, orig_done), depth=4 * bs):
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
            elif kind in ("bad_pair", "skip_pair"):  # an image that cannot be decoded: quarantine, not original/
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
                work.append(item)
                if len(work) >= bs:
                    work = self._run_batch(work[:bs]) + work[bs:]
            out.maybe_commit()
        while work:
            work = self._run_batch(work[:bs]) + work[bs:]
            out.maybe_commit()
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
            self._quarantine(source_quarantine(q, key), f"source:{q.reason}")

    def _run_batch(self, batch: list[Planned]) -> list[Planned]:
        """Generate one batch; returns the requests to retry (new attempt, new seed)."""
        cfg = self.config
        reqs = [TeacherRequest(
            key=p.key, task=p.task, prompt=p.prompt, image=p.image, schema=self.schemas[p.task],
            seed=attempt_seed(cfg.seed, p.key, p.attempt), sampling=self.sampling, attempt=p.attempt, k=self.k,
            context={"meta": p.pair.meta, "role": p.role, "dataset": p.pair.source},
        ) for p in batch]
        t0 = time.perf_counter()
        results = self.teacher.generate(reqs)
        self.summary.generate_seconds += time.perf_counter() - t0
        if len(results) != len(reqs):
            raise TeacherError(f"the {self.backend} teacher returned {len(results)} results for {len(reqs)} requests")
        # whatever the teacher (a user's own included): text that cannot be stored as UTF-8 is a rejected
        # answer with its reason, never a crash of the quarantine writer
        results = [_storable(r) for r in results]
        retry: list[Planned] = []
        for p, r in zip(batch, results):
            s = self.summary
            s.prompt_tokens += token_count(r.prompt_tokens)  # a user's teacher's counts are checked too
            s.completion_tokens += token_count(r.completion_tokens)
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
                out = parse_output(p.task, r.text, self.k, **self.limits)
            except OutputError as e:
                if p.attempt < self.max_retries:
                    p.attempt += 1
                    retry.append(p)
                elif r.finish_reason == "length":  # cut off by --max-tokens, not malformed by the model
                    self._finish_quarantine(p, "truncated", f"the output reached --max-tokens "
                                            f"{self.sampling.max_tokens} before it was complete ({e.reason}: {e.detail}); "
                                            "raise --max-tokens or lower --caption-chars / --qa-chars", r.text)
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
        rows = synth_rows(p, out, teacher=self.teacher_info(), params_hash=self.params_hash,
                          seed=attempt_seed(self.config.seed, p.key, p.attempt))
        assert self._out is not None
        self._out.write_rows(rows, len(p.image))
        s.records[p.task] += len(rows)  # never 0: a caption, or 1..k QA pairs

    def _finish_quarantine(self, p: Planned, reason: str, detail: str, raw: str) -> None:
        if p.attempt:
            self.summary.retried += 1
        self._images.add(p.image_digest)
        self._quarantine(request_quarantine(p, reason, detail, raw, teacher=self.teacher_info(),
                                            params_hash=self.params_hash, params=self.params), reason)

    def _quarantine(self, rec: QuarantineRecord, reason: str) -> None:
        """Write a quarantine row and count it under ``reason``."""
        assert self._out is not None
        self._out.write_quarantine(rec)
        self.summary.quarantined += 1
        self.summary.reasons[reason] += 1

    # -- progress -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _progress(self, total: int | None) -> Iterator[Any]:
        from ...progress import bar  # a live bar on a terminal, plain periodic lines in logs and pipes

        self._t_start = time.time()
        prog = bar(unit="pairs", fields=("{task.fields[stats]}",), console=self.console,
                   disable=not self.config.progress, refresh_per_second=2, transient=False)
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


def run_synth(config: SynthConfig, teacher: Teacher | None = None, console: Any = None) -> SynthSummary:
    """Run (or resume) synthesis as configured; returns a summary. See :mod:`cocoa.datagen.synth`."""
    return Synthesizer(config, teacher=teacher, console=console).run()


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
