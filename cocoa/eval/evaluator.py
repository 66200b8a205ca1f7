"""The evaluator: unique inputs -> cached embeddings -> P@1 per dataset -> MMEB-style averages.

:func:`evaluate` is the library entry point (``cocoa-eval`` is a thin wrapper over it)::

    from cocoa.eval import evaluate
    result = evaluate("runs/demo/stage3/model", "scenes", data="demo/scenes")
    result.overall, result.meta_tasks["vqa"], result.splits["OOD"], result.summary()

Work plan of one run:

1. load the evaluation sets (scenes: ``root/eval/<dataset>/``; MMEB: the MMEB-eval layout);
2. collect every unique encoder input across all datasets -- queries and candidates alike, keyed by
   the text and the image's bytes -- so a label set or retrieval pool shared by many queries (or by
   several datasets) is encoded once;
3. look the inputs up in the on-disk cache (model hash + input hash, :mod:`cocoa.eval.cache`);
4. encode only the missing ones, longest first in batches of similar length; under ``torchrun`` each
   rank encodes a strided share and rank 0 gathers them; new embeddings are written to the cache in
   atomic chunks as they come, so an interrupted run resumes where it stopped;
5. score P@1 (:mod:`cocoa.eval.scoring`) and write ``results.json``, ``results.md``, ``results.png``.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from ..config import Config
from ..records import RecordError, digest
from .cache import EmbeddingCache, default_cache_dir, input_key, model_fingerprint
from .data import EvalSet
from .scoring import EvalResult, aggregate, dataset_score, hits_at_1
from ..errors import CocoaError


REPORT_LOCK = ".cocoa-eval.lock"  # in the report directory, held while a run that writes its reports is going


class EvalError(CocoaError):
    """The evaluation cannot run as asked; the message says why and what to change."""


class EvalConfig(Config):
    """Settings of one ``cocoa-eval`` run (every field is also a flag: ``--mmeb-dir``, ``--batch-size``...)."""

    model: str = Field("", description="model directory saved by cocoa-train (weights, processor, cocoa.json)")
    benchmark: Literal["scenes", "mmeb"] = Field("scenes", description="which benchmark to run")
    data: str | None = Field(None, description="scenes: the root written by `cocoa-data scenes` (or its eval/ dir)")
    mmeb_dir: str | None = Field(None, description="mmeb: directory in the MMEB-eval layout (parquet per dataset + images)")
    mmeb_image_dir: str | None = Field(None, description="mmeb: extracted images, if not in MMEB_DIR/images.zip or eval_images/")
    on_bad_row: Literal["raise", "skip"] = Field(
        "raise", description="mmeb: a row with an unusable image/empty positive stops the run, or is skipped and counted")
    datasets: list[str] = Field(default_factory=list, description="only these datasets, comma-separated (default: all)")
    limit: int | None = Field(None, ge=1, description="score at most the first N queries of each dataset (quick runs)")
    out: str | None = Field(None, description="where to write results.json/.md/.png (default: MODEL/eval-BENCHMARK)")
    cache: bool = Field(True, description="reuse and store embeddings in the on-disk cache")
    cache_dir: str | None = Field(None, description="embedding cache root (default: $COCOA_CACHE/embeddings)")
    batch_size: int = Field(16, ge=1, description="inputs per forward pass (per GPU)")
    pooling: Literal["eos", "last", "mean"] | None = Field(
        None, description="pooling for a model without cocoa.json (overrides cocoa.json when given)")
    eos_token: str | None = Field(None, description="EOS token for a model without cocoa.json (overrides it when given)")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N (under torchrun: the local GPU)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype (auto: bfloat16 on GPUs that support it, else float32)")
    compare: str | None = Field(None, description="results.json of another run: adds a before column and the difference")
    label: str = Field("", description="name of this model in tables and plots (default: from the model path)")
    plot: bool = Field(True, description="write the results.png bar chart")
    flush_every: int = Field(2048, ge=1, description="write new embeddings to the cache every N inputs")


# ---------------------------------------------------------------------------------------------
# loading the evaluation sets
# ---------------------------------------------------------------------------------------------
def load_sets(benchmark: str, *, data: str | Path | None = None, mmeb_dir: str | Path | None = None,
              datasets: Sequence[str] | None = None, limit: int | None = None, mmeb_image_dir: str | Path | None = None,
              on_bad_row: str = "raise") -> list[EvalSet]:
    from . import data as D

    if isinstance(datasets, str):  # "A,B" from a caller that skipped the CLI's splitting
        datasets = [d.strip() for d in datasets.split(",") if d.strip()]
    datasets = list(dict.fromkeys(datasets)) if datasets else None
    if benchmark == "scenes":
        if data is None:
            raise EvalError("the scenes benchmark needs --data: the root written by `cocoa-data scenes` (or its eval/ dir)")
        return D.load_scenes(data, datasets, limit)
    if benchmark == "mmeb":
        if mmeb_dir is None:
            raise EvalError("the mmeb benchmark needs --mmeb-dir: a directory in the MMEB-eval layout "
                            "(one parquet config per dataset + the images)")
        return D.load_mmeb(mmeb_dir, datasets, limit, image_dir=mmeb_image_dir, on_bad_row=on_bad_row)
    raise EvalError(f"unknown benchmark {benchmark!r}; use scenes or mmeb")


# ---------------------------------------------------------------------------------------------
# unique inputs
# ---------------------------------------------------------------------------------------------
class _Inputs:
    """Every distinct encoder input of the run, keyed by (text, image bytes)."""

    def __init__(self) -> None:
        self.items: dict[str, tuple[str, Any]] = {}
        self._img: dict[Any, tuple[str, tuple[int, int] | None]] = {}

    def image(self, ref: Any, s: EvalSet) -> tuple[str, tuple[int, int] | None]:
        from ..model.embedder import image_header_size

        if ref.bytes is None and s.read_image is not None:
            known = s.image_info.get(ref.path)
            if known is not None:
                return known
            mkey: Any = ("r", id(s.read_image), ref.path)
        elif ref.bytes is not None:
            return digest(ref.bytes), image_header_size(ref.bytes)
        else:
            mkey = ("p", str(ref.resolve(s.root)))
        hit = self._img.get(mkey)
        if hit is None:
            data = s.read_image(ref.path) if (ref.bytes is None and s.read_image is not None) else ref.read_bytes(s.root)
            hit = (digest(data), image_header_size(data))
            self._img[mkey] = hit
        return hit

    def add(self, text: str, ref: Any, s: EvalSet) -> str:
        from ..model.collate import check_image_size, check_text
        from ..model.embedder import LazyImage

        check_text(text, "its text")  # the collator's rule, named with the record before any encoding
        if ref is None:
            key = input_key(text, None)
            if key not in self.items:
                self.items[key] = (text, None)
            return key
        dg, size = self.image(ref, s)
        check_image_size(size, f"its image {ref.path or '(embedded)'}")
        key = input_key(text, dg)
        if key not in self.items:
            self.items[key] = (text, LazyImage(ref=ref, root=s.root, size=size, reader=s.read_image))
        return key


def _collect(sets: list[EvalSet]) -> tuple[_Inputs, list[tuple[list[str], list[list[str]]]]]:
    inputs = _Inputs()
    plan = []
    for s in sets:
        q_keys: list[str] = []
        c_keys: list[list[str]] = []
        for r in s.records:
            try:
                q_keys.append(inputs.add(r.qry_text, r.qry_image, s))
                cs = []
                for j, (t, im) in enumerate(zip(r.tgt_texts, r.tgt_images)):
                    if not t.strip() and im is None:  # EvalRecord refuses an empty positive; guard the rest
                        what = "the positive candidate (index 0)" if j == 0 else f"candidate {j}"
                        raise RecordError(f"{what} is empty (no text and no image); fix or drop this record")
                    cs.append(inputs.add(t, im, s))
                c_keys.append(cs)
            except CocoaError as e:
                raise RecordError(f"{s.source or s.name}: record {r.id} ({s.name}): {e}") from None
        plan.append((q_keys, c_keys))
    return inputs, plan


# ---------------------------------------------------------------------------------------------
# distributed helpers (torchrun): encoding is sharded, rank 0 scores and writes the reports
# ---------------------------------------------------------------------------------------------
def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _dist_setup(world: int, local_rank: int, device: str) -> tuple[str, bool]:
    """Initialise the process group if needed; returns (this rank's device, whether we created the group)."""
    import torch
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and not device.startswith("cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    created = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        created = True
    return device, created


def _default_label(model_dir: Path | None) -> str:
    if model_dir is None:
        return "model"
    parts = model_dir.resolve().parts
    return "/".join(parts[-3:]) if model_dir.name == "model" and len(parts) >= 3 else model_dir.name


# ---------------------------------------------------------------------------------------------
# the evaluator
# ---------------------------------------------------------------------------------------------
def evaluate(model: str | Path | Any, benchmark: str = "scenes", *, data: str | Path | None = None,
             mmeb_dir: str | Path | None = None, datasets: Sequence[str] | None = None, limit: int | None = None,
             mmeb_image_dir: str | Path | None = None, on_bad_row: str = "raise", out: str | Path | None = None, cache: bool = True, cache_dir: str | Path | None = None,
             batch_size: int = 16, pooling: str | None = None, eos_token: str | None = None, device: str = "auto",
             dtype: str = "auto", compare: str | Path | EvalResult | None = None, label: str = "", plot: bool = True,
             flush_every: int = 2048, write: bool = True, quiet: bool = False, console: Any = None,
             sets: list[EvalSet] | None = None) -> EvalResult:
    """Evaluate a model (a directory, or a loaded :class:`~cocoa.model.embedder.Embedder`) on a benchmark.

    Returns the :class:`EvalResult` (on every rank under torchrun). Unless ``write=False``, rank 0 writes
    ``results.json``/``results.md``/``results.png`` to ``out`` (default ``MODEL/eval-BENCHMARK``) and,
    unless ``quiet``, prints the table. ``sets`` evaluates given :class:`EvalSet` s instead of loading
    ``benchmark`` (the name is then only a label).
    """
    from ..model.embedder import Embedder, check_device, resolve_spec

    t0 = time.time()
    rank, world, local_rank = _dist_env()
    embedder: Embedder | None = model if isinstance(model, Embedder) else None
    model_dir = embedder.model_dir if embedder is not None else Path(model)
    if embedder is not None:
        spec = embedder.spec
        if model_dir is None:
            raise EvalError("this Embedder was not loaded from a directory; evaluate a model directory instead")
    else:
        spec = resolve_spec(model_dir, pooling, eos_token)  # clear error for a missing cocoa.json, before any work
        check_device(device)  # a bad --device is refused even when every embedding is already cached

    compare_result = None
    if compare is not None:
        compare_result = compare if isinstance(compare, EvalResult) else EvalResult.load(compare)
        if compare_result.benchmark and compare_result.benchmark != benchmark:
            warnings.warn(f"--compare result is from benchmark {compare_result.benchmark!r}, this run is {benchmark!r}",
                          stacklevel=2)

    if sets is None:
        sets = load_sets(benchmark, data=data, mmeb_dir=mmeb_dir, datasets=datasets, limit=limit,
                         mmeb_image_dir=mmeb_image_dir, on_bad_row=on_bad_row)
    if not sets:
        raise EvalError(f"no evaluation datasets found for benchmark {benchmark!r}")
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise EvalError(f"dataset names must be unique, got {names}")

    out_dir = Path(out) if out else model_dir / f"eval-{benchmark}"
    with contextlib.ExitStack() as held:
        if write and rank == 0:  # one writer per report directory: two runs would mix their json/md/png
            from ..fs import NotWritableError, exclusive_lock

            try:
                held.enter_context(exclusive_lock(out_dir, name=REPORT_LOCK, what=f"another cocoa-eval writes {out_dir}:"))
            except (OSError, NotWritableError) as e:  # read-only model dir (a hub snapshot), a file in the way, ...
                why = getattr(e, "strerror", None) or e
                raise EvalError(f"cannot write the reports to {out_dir} ({why}); pass --out DIR "
                                "(a writable directory); from Python, evaluate(..., write=False) writes nothing") from None
        return _evaluate(
            t0=t0, rank=rank, world=world, local_rank=local_rank, embedder=embedder, model_dir=model_dir, spec=spec,
            compare_result=compare_result, sets=sets, benchmark=benchmark, cache=cache, cache_dir=cache_dir,
            batch_size=batch_size, pooling=pooling, eos_token=eos_token, device=device, dtype=dtype, label=label,
            plot=plot, flush_every=flush_every, write=write, quiet=quiet, console=console, out_dir=out_dir)


def _evaluate(*, t0: float, rank: int, world: int, local_rank: int, embedder: Any, model_dir: Path, spec: Any,
              compare_result: EvalResult | None, sets: list[EvalSet], benchmark: str, cache: bool,
              cache_dir: str | Path | None, batch_size: int, pooling: str | None, eos_token: str | None, device: str,
              dtype: str, label: str, plot: bool, flush_every: int, write: bool, quiet: bool, console: Any,
              out_dir: Path) -> EvalResult:
    from .._version import __version__
    from ..model.embedder import Embedder, encode_progress, estimate_length

    spec_dict = spec.model_dump(mode="json")
    root = (Path(cache_dir) if cache_dir else default_cache_dir()) if cache else None
    model_hash, covered = model_fingerprint(model_dir, spec_dict, root)
    store = EmbeddingCache(root, model_hash, covered)

    inputs, plan = _collect(sets)
    keys_all = list(inputs.items)
    missing = store.missing(keys_all)
    n_cached = len(keys_all) - len(missing)

    created_group = False
    enc_seconds = 0.0
    if world > 1:
        import torch.distributed as dist

        dev, created_group = _dist_setup(world, local_rank, device)
        box = [missing]
        dist.broadcast_object_list(box, src=0)  # every rank works from rank 0's view of the cache
        missing = box[0]
    else:
        dev = device
    try:
        if missing:
            # longest first, deterministic; a strided share per rank keeps the ranks' loads balanced
            lengths = {k: estimate_length(spec, *inputs.items[k]) for k in missing}
            ordered = sorted(missing, key=lambda k: (-lengths[k], k))
            share = ordered[rank::world]
            if embedder is None and share:
                embedder = Embedder.from_pretrained(model_dir, pooling=pooling, eos_token=eos_token, device=dev,
                                                    dtype=dtype)
            emb_ = embedder
            buf_keys: list[str] = []
            buf_emb: list[np.ndarray] = []

            def flush() -> None:
                if buf_keys:
                    store.put(list(buf_keys), np.concatenate(buf_emb))
                    buf_keys.clear()
                    buf_emb.clear()

            def on_batch(idx: list[int], emb: np.ndarray) -> None:
                buf_keys.extend(share[i] for i in idx)
                buf_emb.append(emb)
                if len(buf_keys) >= flush_every:
                    flush()

            te = time.time()
            items = [inputs.items[k] for k in share]
            with encode_progress(len(share), f"encoding {len(share)} new inputs" + (f" (rank {rank})" if world > 1 else ""),
                                 console=console, disable=quiet or rank != 0) as advance:
                if items and emb_ is not None:
                    emb_.encode_items(items, batch_size=batch_size, lengths=[lengths[k] for k in share],
                                      progress=advance, on_batch=on_batch)
            flush()
            enc_seconds = time.time() - te
            if world > 1:
                import torch.distributed as dist

                mine = (share, store.get(share) if share else None)
                gathered: list[Any] | None = [None] * world if rank == 0 else None
                dist.gather_object(mine, gathered, dst=0)
                if rank == 0:
                    for r, (ks, em) in enumerate(gathered or []):
                        if r != 0 and ks:
                            store.put(ks, em, persist=False)
        result = None
        if rank == 0:
            scores = _score(sets, plan, store)
            meta, splits, overall = aggregate(scores)
            result = EvalResult(
                model=str(model_dir), model_hash=model_hash, benchmark=benchmark, label=label or _default_label(model_dir),
                datasets=scores, meta_tasks=meta, splits=splits, overall=overall, spec=spec_dict,
                encode={"unique_inputs": len(keys_all), "cached": n_cached, "encoded": len(missing),
                        "encode_seconds": round(enc_seconds, 3),
                        "inputs_per_second": round(len(missing) / enc_seconds, 3) if enc_seconds > 0 else None,
                        "batch_size": batch_size, "world_size": world, "seconds": round(time.time() - t0, 3),
                        "cache_dir": str(store.root) if store.root else None},
                cocoa_version=__version__,
            )
        if world > 1:
            import torch.distributed as dist

            box2 = [result]
            dist.broadcast_object_list(box2, src=0)
            result = box2[0]
            # every rank arrives at the teardown together: a rank that destroyed its gloo group while rank 0 was
            # still finishing the broadcast aborted once in CI ("terminate called without an active exception",
            # SIGABRT); the training side ends each stage on a barrier the same way
            dist.barrier()
    finally:
        for s_ in sets:
            src = s_.meta.get("image_source")
            if src is not None:
                src.close()
        if created_group:
            import torch.distributed as dist

            dist.destroy_process_group()
    assert result is not None
    if rank == 0:
        if write:
            from .report import write_reports

            paths = write_reports(result, out_dir, compare_result, make_plot=plot)
        if not quiet:
            from rich.console import Console

            from .report import rich_table

            con = console or Console(highlight=False)
            con.print(rich_table(result, compare_result))
            enc = result.encode
            con.print(f"{enc['unique_inputs']} unique inputs: {enc['cached']} from the cache, {enc['encoded']} encoded"
                      + (f" ({enc['inputs_per_second']:.1f}/s)" if enc.get("inputs_per_second") else "")
                      + f"; {enc['seconds']:.1f} s in all")
            if write:
                con.print("reports: " + ", ".join(str(p) for p in paths.values()))
    return result


def _score(sets: list[EvalSet], plan: list[tuple[list[str], list[list[str]]]], store: EmbeddingCache):  # type: ignore[no-untyped-def]
    out = {}
    for s, (q_keys, c_keys) in zip(sets, plan):
        uniq: dict[str, int] = {}
        for k in q_keys:
            uniq.setdefault(k, len(uniq))
        for cs in c_keys:
            for k in cs:
                uniq.setdefault(k, len(uniq))
        emb = store.get(list(uniq))
        qi = np.fromiter((uniq[k] for k in q_keys), dtype=np.int64, count=len(q_keys))
        ci = [[uniq[k] for k in cs] for cs in c_keys]
        hits, trivial = hits_at_1(emb[qi], emb, ci)
        mean_c = float(np.mean([len(c) for c in c_keys])) if c_keys else 0.0
        out[s.name] = dataset_score(s.meta_task, s.split, hits, trivial, mean_c, n_skipped=s.n_skipped)
    return out


def run(config: EvalConfig, **kw: Any) -> EvalResult:
    """:func:`evaluate` with an :class:`EvalConfig`."""
    if not config.model:
        raise EvalError("no model given: pass --model DIR (a directory saved by cocoa-train)")
    return evaluate(**config.model_dump(), **kw)
