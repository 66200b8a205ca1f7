"""Benchmark: cocoa curation and dedupe vs a datasketch MinHashLSH baseline, on the same rows in one run.

    python bench/curate_bench.py                  # 1M rows (targets: dedupe >= 20x datasketch at recall >= 0.95;
                                                  #  curate <= 4 GB peak RSS (GB = GiB here: ru_maxrss / 1024**2), <= 60 s)
    python bench/curate_bench.py --rows 200000    # smaller
    python bench/curate_bench.py --rows 4000000 --skip-baseline   # memory at 4M rows (rows per GB of RAM)

A generated corpus of caption-like rows (template sentences over a pseudo-word vocabulary) with planted
exact duplicates and near duplicates (one word substituted, inserted or deleted, or two sentences
swapped). Every measured part runs in its own child process so its peak RSS is its own:

1. cocoa dedupe: exact (xxh3 digest) + near (rensa MinHash, LSH, connected components) on the texts;
2. datasketch dedupe: MinHash(num_perm) + MinHashLSH(same bands x rows) + the same verification and
   components, on a subsample of whole duplicate groups when the corpus is large, extrapolated
   linearly to the full corpus (said in the output);
3. cocoa's full `curate` on the corpus written as SynthRecord shards (every rule, image checks on
   ``rows/20`` distinct images, writes curated/ and rejected/).

Prints time, peak RSS, recall and precision on the planted pairs, and the speed ratio.
Importable without polars/datasets (they are imported inside the child functions).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ADJ, NOUN, VERB = 1500, 3000, 400
SYL = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "pe", "su", "da", "fi", "go", "hu", "ja", "be", "ro", "wi"]


def _words(n: int, rng: np.random.Generator, seen: set[str]) -> list[str]:
    out = []
    while len(out) < n:
        w = "".join(rng.choice(SYL, size=int(rng.integers(2, 5))))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def generate(rows: int, seed: int = 0, exact_share: float = 0.08, near_share: float = 0.12):
    """Texts and, per row, its planted group (rows of one group are duplicates of each other)."""
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    adj, noun, verb = _words(ADJ, rng, seen), _words(NOUN, rng, seen), _words(VERB, rng, seen)
    n_base = int(rows * (1 - exact_share - near_share))
    a = rng.integers(0, ADJ, size=(n_base, 6))
    n = rng.integers(0, NOUN, size=(n_base, 6))
    v = rng.integers(0, VERB, size=(n_base, 2))
    k = rng.integers(2, 9, size=n_base)
    sents = []
    for i in range(n_base):
        A, N, V = a[i], n[i], v[i]
        s1 = f"A {adj[A[0]]} {noun[N[0]]} {verb[V[0]]} near the {adj[A[1]]} {noun[N[1]]} on the left."
        s2 = f"The {noun[N[2]]} is {adj[A[2]]} and {adj[A[3]]}, with {k[i]} {noun[N[3]]} beside it."
        s3 = f"Behind them a {adj[A[4]]} {noun[N[4]]} {verb[V[1]]} under a {adj[A[5]]} {noun[N[5]]}."
        sents.append((s1, s2, s3))
    texts = [" ".join(s) for s in sents]
    group = list(range(n_base))
    kinds = ["base"] * n_base
    for _ in range(rows - n_base):
        g = int(rng.integers(0, n_base))
        if rng.random() < exact_share / (exact_share + near_share):
            texts.append(texts[g])
            kinds.append("exact")
        else:
            s = list(sents[g])
            op = int(rng.integers(0, 4))
            if op == 3:  # reorder two sentences
                i, j = rng.choice(3, size=2, replace=False)
                s[i], s[j] = s[j], s[i]
                t = " ".join(s)
            else:
                w = " ".join(s).split()
                p = int(rng.integers(1, len(w) - 1))
                if op == 0:
                    w[p] = noun[int(rng.integers(0, NOUN))]
                elif op == 1:
                    w.insert(p, adj[int(rng.integers(0, ADJ))])
                else:
                    del w[p]
                t = " ".join(w)
            texts.append(t)
            kinds.append(["substitute", "insert", "delete", "reorder"][op])
        group.append(g)
    order = rng.permutation(rows)
    return [texts[i] for i in order], np.asarray(group)[order], [kinds[i] for i in order]


def score(rep: np.ndarray, group: np.ndarray) -> dict[str, float]:
    """Recall: share of planted (first-of-group, member) pairs that end in one cluster.
    Precision: share of dropped rows whose kept representative is in the same planted group."""
    first: dict[int, int] = {}
    for i, g in enumerate(group.tolist()):
        first.setdefault(g, i)
    pairs = [(first[g], i) for i, g in enumerate(group.tolist()) if first[g] != i]
    rec = np.mean([rep[a] == rep[b] for a, b in pairs]) if pairs else 1.0
    dropped = np.flatnonzero(rep != np.arange(len(rep)))
    prec = float(np.mean(group[rep[dropped]] == group[dropped])) if len(dropped) else 1.0
    return {"recall": float(rec), "precision": prec, "planted_pairs": len(pairs), "dropped": int(len(dropped))}


# ---------------------------------------------------------------------------------------------
# children (each measured in its own process)
# ---------------------------------------------------------------------------------------------
def child_cocoa_dedupe(texts_file: str, out: str, num_perm: int, bands: int, threshold: float) -> dict:
    import polars as pl

    from cocoa.curation.dedup import first_of_groups, near_duplicates, text_digests
    from cocoa.curation.text import normalize_series, word_hashes

    import pyarrow.ipc as ipc

    # read into memory (not memory-mapped) before the clock starts, as the baseline's texts are
    texts = pl.from_arrow(ipc.open_file(texts_file).read_all().column("text"))
    importlib.import_module("scipy.sparse.csgraph")  # imported before the clock starts, as the baseline's imports are

    t0, c0 = time.perf_counter(), time.process_time()
    norm = normalize_series(texts)  # NFC + whitespace, on the rows that need it (as `curate` does)
    first = first_of_groups(text_digests(norm.str.to_lowercase()))
    alive = np.flatnonzero(first == np.arange(len(first)))
    f, o = word_hashes(norm.gather(alive))
    res = near_duplicates(f, o, num_perm=num_perm, bands=bands, threshold=threshold)
    rep = first.copy()
    rep[alive] = alive[res.rep]
    rep = rep[rep]  # exact copies of a near-dup follow their representative
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    np.save(out, rep)
    return {"seconds": secs, "cpu_seconds": cpu, "candidates": res.candidates, "pairs_checked": res.pairs_checked}


def child_datasketch(texts_file: str, out: str, num_perm: int, bands: int, threshold: float, rows_file: str) -> dict:
    import re

    import pyarrow.ipc as ipc
    from datasketch import MinHash, MinHashLSH
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    texts = ipc.open_file(texts_file).read_all().column("text").to_pylist()
    idx = np.load(rows_file)
    texts = [texts[i] for i in idx]
    t0, c0 = time.perf_counter(), time.process_time()
    r = num_perm // bands
    lsh = MinHashLSH(num_perm=num_perm, params=(bands, r))
    sigs = []
    for i, t in enumerate(texts):
        w = re.findall(r"\w+", " ".join(t.split()).lower())
        sh = {" ".join(w[j:j + 3]).encode() for j in range(max(1, len(w) - 2))}
        m = MinHash(num_perm=num_perm, seed=1)
        m.update_batch(list(sh))
        lsh.insert(i, m)
        sigs.append(m)
    a, b = [], []
    for i, m in enumerate(sigs):
        for j in lsh.query(m):
            if j > i and m.jaccard(sigs[j]) >= threshold:
                a.append(i)
                b.append(j)
    n = len(texts)
    g = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    _, labels = connected_components(g, directed=False)
    first: dict[int, int] = {}
    rep = np.array([first.setdefault(int(lab), i) for i, lab in enumerate(labels)])
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    np.save(out, rep)
    return {"seconds": secs, "cpu_seconds": cpu}


def child_curate(ws: str) -> dict:
    from cocoa.curation.pipeline import run_curation

    t0, c0 = time.perf_counter(), time.process_time()
    res = run_curation(ws, show_progress=False)
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, "rows_out": res.kept, "rejected": res.rejected,
            "drops": {k: v["count"] for k, v in res.report["drops"].items() if v["count"]},
            "timings": res.report["timings_s"]}


def write_workspace(ws: Path, texts: list[str], n_images: int, seed: int = 0) -> None:
    """The corpus as SynthRecord caption shards (fast Arrow path; ids are the records' content ids)."""
    import pyarrow as pa

    from cocoa.testing.curation import noise_png
    from cocoa.records import content_id
    from cocoa.shards import ShardWriter

    rng = np.random.default_rng(seed + 1)
    imgs = [noise_png(10_000 + i, size=(32, 32), cells=8) for i in range(n_images)]
    which = rng.integers(0, n_images, size=len(texts))
    with ShardWriter(ws / "synthetic", "SynthRecord", mode="overwrite", max_rows=50_000) as w:
        for s in range(0, len(texts), 50_000):
            part = texts[s:s + 50_000]
            n = len(part)
            keys = [f"bench/{s + i}" for i in range(n)]
            w.write_table(pa.table({
                "id": [content_id("SynthRecord", k, "caption", t, None, None) for k, t in zip(keys, part)],
                "parent_id": [f"img{which[s + i]}" for i in range(n)],
                "source": ["bench"] * n,
                "image": pa.array([{"bytes": imgs[which[s + i]], "path": None} for i in range(n)]),
                "kind": ["caption"] * n,
                "caption": part,
                "question": pa.nulls(n, pa.string()),
                "answer": pa.nulls(n, pa.string()),
                "teacher": [{"backend": "bench", "model": "bench", "revision": ""}] * n,
                "template": [{"name": "bench", "hash": "0"}] * n,
                "params_hash": ["p"] * n,
                "key": keys,
                "meta": ["{}"] * n,
            }))


def run_child(args: list[str]) -> tuple[dict, float]:
    """Run this script as a child; returns its JSON result and its own peak RSS in GB."""
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"child {args[:2]} failed:\n{p.stderr[-4000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    return res, res["peak_rss_kb"] / 1024**2  # Linux reports ru_maxrss in KiB


def _peak_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class DescendantPeak:
    """Largest peak RSS (VmHWM, KiB) among this process's descendants, sampled from /proc while they run.

    curate's image workers are forkserver children: they are the forkserver's children, not ours, so
    RUSAGE_CHILDREN never counts them (it read 0). Each process's VmHWM is its own high-water mark, so a
    sample taken any time before it exits holds its peak up to then.
    """

    def __init__(self, every: float = 0.1) -> None:
        import threading
        self.every, self.peak_kb, self._stop = every, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "DescendantPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.sample()
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def sample(self) -> None:
        parent: dict[int, int] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:  # "pid (comm) state ppid ...": comm may hold spaces
                        parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
        me, kids = os.getpid(), set()
        for pid in parent:
            p, hops = pid, 0
            while p in parent and p != me and hops < 64:
                p, hops = parent[p], hops + 1
            if p == me and pid != me:
                kids.add(pid)
        for pid in kids:
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            self.peak_kb = max(self.peak_kb, int(line.split()[1]))
                            break
            except OSError:
                continue


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--images", type=int, default=None, help="distinct images for the curate run (default rows/20)")
    ap.add_argument("--baseline-rows", type=int, default=50_000,
                    help="datasketch runs on at most this many rows (whole duplicate groups), extrapolated linearly")
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--bands", type=int, default=16)
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--no-curate", action="store_true", help="skip the full curate run")
    ap.add_argument("--skip-baseline", action="store_true",
                    help="skip the datasketch baseline (for the memory figure at large --rows: rows per GB of RAM)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--max-load", type=float, default=1.5,
                    help="refuse to measure when the 1-minute load average before the run is above this")
    ap.add_argument("--allow-loaded", action="store_true",
                    help="measure and write the figures on a loaded machine anyway (marked loaded in summary.json)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-args", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        ca = json.loads(args.child_args)
        fn = {"cocoa": child_cocoa_dedupe, "datasketch": child_datasketch, "curate": child_curate}[args.child]
        with DescendantPeak() as workers:
            res = fn(**ca)
        res["peak_rss_kb"] = _peak_kb()
        # image-analysis worker processes (curate): the largest one's peak RSS
        res["worker_peak_rss_kb"] = workers.peak_kb
        print(json.dumps(res))
        return

    import pyarrow as pa
    import pyarrow.ipc as ipc

    # Figures from a loaded machine are not comparable (datasketch slows down more than cocoa under load:
    # docs/benchmarks.md). The gate is the 1-minute load average *before* the run: the bench's own processes
    # raise it while they run (recorded too, at the end).
    load_before = os.getloadavg()
    loaded = load_before[0] > args.max_load
    if loaded and not args.allow_loaded:
        sys.exit(f"curate_bench: the 1-minute load average is {load_before[0]:.2f} (> {args.max_load}): figures "
                 "measured now would not be comparable; wait for an idle machine, or pass --allow-loaded to measure "
                 "anyway (the summary is then marked loaded)")
    if loaded:
        print(f"warning: load average {load_before[0]:.2f} > {args.max_load}: these figures are from a LOADED machine "
              "(--allow-loaded) and are marked so in summary.json")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="curate_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    texts, group, kinds = generate(args.rows)
    tf = work / "texts.arrow"
    with ipc.new_file(str(tf), pa.schema([("text", pa.string())])) as w:
        w.write_table(pa.table({"text": texts}))
    print(f"corpus: {args.rows:,} rows, {len(set(group.tolist())):,} groups, planted: "
          + ", ".join(f"{k} {kinds.count(k):,}" for k in ("exact", "substitute", "insert", "delete", "reorder"))
          + f" ({time.perf_counter() - t0:.1f} s to generate)")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: {cores} cores visible, load average {os.getloadavg()[0]:.1f} (shared machines: timings are noisy)")
    common = {"num_perm": args.num_perm, "bands": args.bands, "threshold": args.threshold}

    # 1) cocoa dedupe on all rows
    res_c, rss_c = run_child(["--child", "cocoa", "--child-args",
                              json.dumps({"texts_file": str(tf), "out": str(work / "rep_cocoa.npy"), **common})])
    rep_c = np.load(work / "rep_cocoa.npy")
    sc_c = score(rep_c, group)

    print()
    print(f"{'dedupe':<12}{'rows':>10}{'wall s':>9}{'CPU s':>9}{'peak RSS GB':>13}{'recall':>9}{'precision':>11}")
    print(f"{'cocoa':<12}{args.rows:>10,}{res_c['seconds']:>9.1f}{res_c['cpu_seconds']:>9.1f}{rss_c:>13.2f}"
          f"{sc_c['recall']:>9.4f}{sc_c['precision']:>11.4f}")
    summary = {"rows": args.rows, "cocoa": {**res_c, **sc_c, "peak_rss_gb": rss_c,
                                            "rows_per_gb": round(args.rows / rss_c)}}

    # 2) datasketch on whole groups (subsample when large)
    if not args.skip_baseline:
        summary.update(_baseline(args, work, tf, group, rep_c, res_c, sc_c, common))
    else:
        print("datasketch baseline skipped (--skip-baseline): no speed ratio in this run")

    # 3) cocoa full curate
    if not args.no_curate:
        n_img = args.images or max(1, args.rows // 20)
        t0 = time.perf_counter()
        write_workspace(work / "shards", texts, n_img)
        print(f"\nwrote {args.rows:,} SynthRecord rows over {n_img:,} distinct images "
              f"({time.perf_counter() - t0:.1f} s, not timed)")
        del texts, kinds  # the parent's copy of the corpus: not needed by the child (the machine's memory)
        res_k, rss_k = run_child(["--child", "curate", "--child-args", json.dumps({"ws": str(work / "shards")})])
        at = "" if args.rows == 1_000_000 else f" (targets are for 1M rows, this is {args.rows:,})"
        print(f"cocoa curate: {args.rows:,} rows in {res_k['seconds']:.1f} s wall ({res_k['cpu_seconds']:.1f} s CPU), peak RSS {rss_k:.2f} GB, "
              f"{res_k['rows_out']:,} kept  [target <= 4 GB: {'met' if rss_k <= 4 else 'MISSED'}; "
              f"target <= 60 s: {'met' if res_k['seconds'] <= 60 else 'MISSED'}{at}]")
        print(f"  (peak RSS is the main process; the largest image worker process peaked at "
              f"{res_k['worker_peak_rss_kb'] / 1024**2:.2f} GB)")
        print("  drops:", res_k["drops"])
        print("  step seconds:", {k: v for k, v in res_k["timings"].items() if v >= 0.05})
        print(f"  rows per GB of peak RSS (main process): {args.rows / rss_k:,.0f}")
        summary["curate"] = {**res_k, "peak_rss_gb": rss_k, "rows_per_gb": round(args.rows / rss_k)}
    summary["load_average"] = {"before_1_5_15min": [round(x, 2) for x in load_before],
                               "after_1_5_15min": [round(x, 2) for x in os.getloadavg()],
                               "max_load": args.max_load, "loaded": loaded}
    (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nsummary: {work / 'summary.json'}")


def _baseline(args, work: Path, tf: Path, group: np.ndarray, rep_c: np.ndarray, res_c: dict, sc_c: dict,  # type: ignore[no-untyped-def]
              common: dict) -> dict:
    """The datasketch baseline on whole duplicate groups (a subsample when the corpus is large), printed beside
    cocoa's figures; returns its summary entries."""
    n_groups = int(group.max()) + 1
    if args.rows > args.baseline_rows:
        keep_groups = max(1, int(n_groups * args.baseline_rows / args.rows))
        sub = np.flatnonzero(group < keep_groups)
    else:
        sub = np.arange(args.rows)
    np.save(work / "sub.npy", sub)
    res_d, rss_d = run_child(["--child", "datasketch", "--child-args",
                              json.dumps({"texts_file": str(tf), "out": str(work / "rep_ds.npy"),
                                          "rows_file": str(work / "sub.npy"), **common})])
    rep_d = np.load(work / "rep_ds.npy")
    sc_d = score(rep_d, group[sub])
    scale = args.rows / len(sub)
    ds_full = res_d["seconds"] * scale
    # cocoa on the same subsample, for a like-for-like recall/precision comparison
    sc_c_sub = score(_restrict(rep_c, sub), group[sub])

    print(f"{'datasketch':<12}{len(sub):>10,}{res_d['seconds']:>9.1f}{res_d['cpu_seconds']:>9.1f}{rss_d:>13.2f}"
          f"{sc_d['recall']:>9.4f}{sc_d['precision']:>11.4f}")
    if scale > 1:
        print(f"datasketch ran on {len(sub):,} rows (whole duplicate groups) and is extrapolated linearly x{scale:.1f} "
              f"to {args.rows:,} rows: {ds_full:.1f} s")
        print(f"cocoa on the same {len(sub):,}-row subset: recall {sc_c_sub['recall']:.4f}, "
              f"precision {sc_c_sub['precision']:.4f}")
    ratio = ds_full / res_c["seconds"]
    cpu_ratio = res_d["cpu_seconds"] * scale / res_c["cpu_seconds"]
    print(f"speed ratio (datasketch / cocoa dedupe, {args.rows:,} rows): {ratio:.1f}x wall, {cpu_ratio:.1f}x CPU  "
          f"[target >= 20x at recall >= 0.95: {'met' if ratio >= 20 and sc_c['recall'] >= 0.95 else 'MISSED'}]")
    return {"datasketch": {**res_d, **sc_d, "rows": int(len(sub)), "extrapolated_seconds": ds_full,
                           "peak_rss_gb": rss_d},
            "speed_ratio": ratio, "cpu_ratio": cpu_ratio}


def _restrict(rep: np.ndarray, sub: np.ndarray) -> np.ndarray:
    """cocoa's clusters restricted to a subset: each row's representative = the earliest subset row of its cluster."""
    pos = {}
    out = np.empty(len(sub), dtype=np.int64)
    for k, i in enumerate(sub.tolist()):
        c = int(rep[i])
        out[k] = pos.setdefault(c, k)
    return out


if __name__ == "__main__":
    main()
