"""Hostile inputs and faults for `cocoa-eval` (issue 12, items 22, 4 and 6): an MMEB-eval copy without
its images.zip, MMEB-eval parquet text that is not UTF-8 (or typed binary), several writers on one
embedding cache (real processes, threads of one process), and cache/model files that are not UTF-8."""

import json
import os
import subprocess
import sys
import textwrap
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

EVAL = str(Path(sys.executable).parent / "cocoa-eval")


def _eval(*args, timeout=120):
    p = subprocess.run([EVAL, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "COLUMNS": "250", "OMP_NUM_THREADS": "1"})
    return p.returncode, p.stdout + p.stderr


@pytest.fixture
def mmeb(tmp_path):
    from cocoa.testing.mmeb import write_mmeb_eval_fixture

    return write_mmeb_eval_fixture(tmp_path / "MMEB-eval", datasets=["ImageNet-1K", "MSCOCO_t2i"], n_per_dataset=2,
                                   n_candidates=3)


# -- item 22: no images.zip -------------------------------------------------------------------------------
@pytest.mark.parametrize("on_bad_row", ["raise", "skip"])
def test_mmeb_without_images_zip_says_the_zip_is_missing_before_any_work(tiny_model_dir, mmeb, tmp_path, on_bad_row):
    (mmeb / "images.zip").unlink()
    rc, out = _eval("--model", tiny_model_dir, "--benchmark", "mmeb", "--mmeb-dir", mmeb, "--cache-dir",
                    tmp_path / "cache", "--out", tmp_path / "out", "--on-bad-row", on_bad_row)
    assert rc == 1 and "Traceback" not in out, out
    assert "images.zip is missing" in out and str(mmeb / "images.zip") in out and "--mmeb-image-dir" in out, out
    assert not (tmp_path / "out").exists() and not list((tmp_path / "cache").glob("*/chunk-*"))  # nothing encoded


def test_mmeb_images_extracted_beside_the_parquet_files_need_no_zip(mmeb):
    from cocoa.eval.data import load_mmeb

    with zipfile.ZipFile(mmeb / "images.zip") as z:
        z.extractall(mmeb)
    (mmeb / "images.zip").unlink()
    sets = load_mmeb(mmeb)
    assert [len(s.records) for s in sets] == [2, 2]
    s = sets[0]
    assert s.read_image(s.records[0].qry_image.path).startswith(b"\xff\xd8")  # read from the extracted file


def test_mmeb_image_dir_given_means_no_zip_is_needed(mmeb, tmp_path):
    from cocoa.eval.data import load_mmeb

    with zipfile.ZipFile(mmeb / "images.zip") as z:
        z.extractall(tmp_path / "imgs")
    (mmeb / "images.zip").unlink()
    assert [len(s.records) for s in load_mmeb(mmeb, image_dir=tmp_path / "imgs")] == [2, 2]


# -- item 6: MMEB-eval text that is not UTF-8 --------------------------------------------------------------
def _bad_utf8_parquet(root: Path) -> Path:
    """ImageNet-1K's parquet with row 1's query text holding the byte 0xff (a string column whose bytes
    are not UTF-8, as a broken converter writes it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = root / "ImageNet-1K" / "test-00000-of-00001.parquet"
    t = pq.read_table(f)
    q = [s.encode() for s in t.column("qry_text").to_pylist()]
    q[1] = q[1][:12] + b"\xff\xfe" + q[1][12:]
    col = pa.array(q, type=pa.binary()).view(pa.string())
    pq.write_table(t.set_column(t.schema.get_field_index("qry_text"), "qry_text", col), f)
    return f


def test_mmeb_eval_text_that_is_not_utf8_is_a_clear_error_or_a_counted_skip(tiny_model_dir, mmeb, tmp_path):
    f = _bad_utf8_parquet(mmeb)
    common = ["--model", tiny_model_dir, "--benchmark", "mmeb", "--mmeb-dir", mmeb, "--cache-dir", tmp_path / "cache",
              "--datasets", "ImageNet-1K", "--no-plot"]
    rc, out = _eval(*common, "--out", tmp_path / "o1")
    assert rc == 1 and "Traceback" not in out and "UnicodeDecodeError" not in out, out
    assert f"{f.parent.name}/{f.name} row 1" in out and "UTF-8" in out and "--on-bad-row skip" in out, out
    from cocoa.eval.data import load_mmeb

    with pytest.warns(UserWarning, match="1 of 2 rows skipped"):  # asked for: the row is skipped and counted
        (s,) = load_mmeb(mmeb, ["ImageNet-1K"], on_bad_row="skip")
    assert len(s.records) == 1 and s.n_skipped == 1


def test_mmeb_eval_text_column_typed_binary_is_decoded_not_stored_as_a_repr(mmeb):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cocoa.eval.data import load_mmeb

    f = mmeb / "ImageNet-1K" / "test-00000-of-00001.parquet"
    t = pq.read_table(f)
    texts = t.column("qry_text").to_pylist()
    t = t.set_column(t.schema.get_field_index("qry_text"), "qry_text", pa.array([s.encode() for s in texts], pa.binary()))
    t = t.set_column(t.schema.get_field_index("tgt_text"), "tgt_text",
                     pa.array([[x.encode() for x in c] for c in t.column("tgt_text").to_pylist()], pa.list_(pa.binary())))
    pq.write_table(t, f)
    (s,) = load_mmeb(mmeb, ["ImageNet-1K"])
    assert [r.qry_text for r in s.records] == texts
    assert all(not t.startswith("b'") for r in s.records for t in r.tgt_texts)


# -- item 4: several writers on one embedding cache -----------------------------------------------------------
WRITER = textwrap.dedent("""
    import sys, numpy as np
    from cocoa.eval.cache import EmbeddingCache, model_fingerprint
    root, who, model_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    def vec(k):
        return np.random.default_rng(abs(hash(k)) % 2**32).standard_normal(8).astype(np.float32)
    for i in range(30):
        c = EmbeddingCache(root, "m" + str(i % 3), {"round": i % 3})
        keys = [f"shared-{i}-{j}" for j in range(4)] + [f"{who}-{i}"]
        c.put(keys, np.stack([vec(k) for k in keys]))
        model_fingerprint(model_dir, {"pooling": "eos"}, root)  # the memo file, rewritten by both
    """)
READER = textwrap.dedent("""
    import pathlib, sys, time, warnings, numpy as np
    from cocoa.eval.cache import EmbeddingCache
    warnings.simplefilter("error")  # an unreadable (half-written) chunk warns: fail on it
    root = sys.argv[1]
    def vec(k):
        return np.random.default_rng(abs(hash(k)) % 2**32).standard_normal(8).astype(np.float32)
    t0, seen, stop = time.time(), 0, pathlib.Path(root + ".done")
    caches = [EmbeddingCache(root, "m" + str(r)) for r in range(3)]
    while not stop.exists() and time.time() - t0 < 30:  # until the writers are done
        for c in caches:
            c.refresh()
            ks = c.keys()
            if ks:
                assert np.array_equal(c.get(ks), np.stack([vec(k) for k in ks])), "wrong embedding for a key"
                seen = max(seen, len(ks))
    assert seen > 0
    print("seen", seen)
    """)


def test_two_processes_and_a_reader_share_one_cache(tmp_path):
    """Concurrent writers are safe by design (torchrun ranks need it): no lock, no lost or torn chunk."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"w" * 1000)
    (model / "config.json").write_text("{}")
    root = tmp_path / "cache"
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", READER, str(root)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)]
    procs += [subprocess.Popen([sys.executable, "-c", WRITER, str(root), who, str(model)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for who in ("a", "b")]
    outs = [p.communicate(timeout=60) for p in procs[1:]]
    (tmp_path / "cache.done").touch()
    outs = [procs[0].communicate(timeout=60)] + outs
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    from cocoa.eval.cache import EmbeddingCache

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for r in range(3):
            c = EmbeddingCache(root, f"m{r}")
            assert sum(k.startswith(("a-", "b-")) for k in c.keys()) == 20  # 10 rounds x 2 writers, none lost
            assert json.loads((root / f"m{r}" / "model.json").read_text()) == {"round": r}
    assert not [p.name for p in root.rglob(".*tmp*")]  # no temporary file left behind
    assert isinstance(json.loads((root / "filehash.json").read_text()), dict)


def test_threads_of_one_process_sharing_a_cache_never_collide(tmp_path):
    """A pid-named temporary file is shared by every thread of a process (and by processes of containers
    with the same pid): two of them writing model.json at once renamed each other's file away."""
    from cocoa.eval.cache import EmbeddingCache

    root = tmp_path / "cache"
    errors: list[BaseException] = []
    n_threads, rounds = 4, 25
    barrier = threading.Barrier(n_threads)

    def work(t):
        try:
            for i in range(rounds):
                barrier.wait()
                c = EmbeddingCache(root, f"h{i}", {"model": i, "pad": "x" * 20000})
                c.put([f"t{t}-{i}"], np.full((1, 4), t, np.float32))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, repr(errors[0])
    for i in range(rounds):
        assert json.loads((root / f"h{i}" / "model.json").read_text())["model"] == i
        assert len(EmbeddingCache(root, f"h{i}")) == n_threads


def test_a_second_eval_writing_the_same_reports_fails_at_once(tiny_model_dir, mmeb, tmp_path):
    """Two runs writing one report directory would mix their results.json/.md/.png (and collided on the
    plot's temporary file): the second fails at once, naming the holder; the lock dies with its process."""
    import signal
    import time

    from cocoa.eval.evaluator import REPORT_LOCK
    from cocoa.fs import is_locked

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from cocoa.fs import exclusive_lock
        with exclusive_lock({str(out)!r}, name={REPORT_LOCK!r}, what="cocoa-eval"):
            print("held", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.time()
        rc, text = _eval("--model", tiny_model_dir, "--benchmark", "mmeb", "--mmeb-dir", mmeb, "--cache-dir",
                         tmp_path / "cache", "--out", out)
        assert rc == 1 and "in use by another cocoa process" in text and f"pid {holder.pid}" in text, text
        assert "Traceback" not in text and time.time() - t0 < 30
        assert not (out / "results.json").exists() and not list((tmp_path / "cache").glob("*/chunk-*"))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert not is_locked(out, name=REPORT_LOCK)  # released by the kernel with the killed holder


def test_reports_that_cannot_be_written_fail_before_any_work(tiny_model_dir, mmeb, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    rc, text = _eval("--model", tiny_model_dir, "--benchmark", "mmeb", "--mmeb-dir", mmeb, "--cache-dir",
                     tmp_path / "cache", "--out", blocker / "out")
    assert rc == 1 and "cannot write the reports to" in text and "--out" in text and "Traceback" not in text, text
    assert not list((tmp_path / "cache").glob("*/chunk-*"))
    rc, text = _eval("--model", tiny_model_dir, "--benchmark", "mmeb", "--mmeb-dir", mmeb, "--cache-dir",
                     blocker / "cache", "--out", tmp_path / "out")
    assert rc == 1 and "cannot write the embedding cache at" in text and "--no-cache" in text, text
    assert "Traceback" not in text and not (tmp_path / "out" / "results.json").exists()


# -- item 6: cache and model files that are not UTF-8 --------------------------------------------------------
def test_memo_file_that_is_not_utf8_or_not_json_is_ignored(tmp_path):
    from cocoa.eval.cache import model_fingerprint

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"w" * 100)
    cache = tmp_path / "cache"
    cache.mkdir()
    h0, _ = model_fingerprint(model, {"pooling": "eos"}, None)
    for junk in (b"\xff\xfe\x00garbage", b"[1, 2, 3]", b'{"trunc'):
        (cache / "filehash.json").write_bytes(junk)
        assert model_fingerprint(model, {"pooling": "eos"}, cache)[0] == h0
        assert isinstance(json.loads((cache / "filehash.json").read_text()), dict)  # rewritten whole


def test_model_config_that_is_not_utf8_names_the_file(tmp_path):
    from cocoa.model.embedder import resolve_spec
    from cocoa.records import RecordError

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_bytes(b'{"model_type": "qwen2_5_vl\xff"}')
    with pytest.raises(RecordError, match="config.json is not a readable model config"):
        resolve_spec(model, pooling="eos")


# -- audit B: aspect ratio, special tokens, --device, tokenizer files, Embedder edges, flag names -------------
def _png(w, h):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _mmeb_with_extra_row(tmp_path, **change):
    import pyarrow.parquet as pq

    from cocoa.testing.mmeb import write_mmeb_eval_fixture

    base = write_mmeb_eval_fixture(tmp_path / "base", datasets=["ImageNet-1K"], n_per_dataset=2, n_candidates=3)
    row = pq.read_table(base / "ImageNet-1K" / "test-00000-of-00001.parquet").to_pylist()[0]
    row.update(change)
    return write_mmeb_eval_fixture(tmp_path / "MMEB-eval", datasets=["ImageNet-1K"], n_per_dataset=2, n_candidates=3,
                                   extra_rows={"ImageNet-1K": [row]},
                                   extra_members={"images/ImageNet-1K/wide.png": _png(4000, 10)})


@pytest.mark.parametrize("change, needle", [
    ({"qry_img_path": "images/ImageNet-1K/wide.png"}, "aspect ratio 400:1"),
    ({"qry_text": "<|image_1|> a <|image_pad|> here"}, "special token '<|image_pad|>'"),
])
def test_mmeb_rows_the_processor_cannot_take_are_named_or_skipped(tmp_path, change, needle):
    from cocoa.errors import CocoaError
    from cocoa.eval.data import load_mmeb

    root = _mmeb_with_extra_row(tmp_path, **change)
    with pytest.raises(CocoaError) as e:
        load_mmeb(root)
    assert "row 2" in str(e.value) and needle in str(e.value) and "--on-bad-row skip" in str(e.value), e.value
    with pytest.warns(UserWarning, match="1 of 3 rows skipped"):
        (s,) = load_mmeb(root, on_bad_row="skip")
    assert len(s.records) == 2 and s.n_skipped == 1


def test_collator_refuses_extreme_aspect_ratio_and_special_tokens_per_row(tiny_model_dir):
    from PIL import Image
    from transformers import AutoProcessor

    from cocoa.errors import CocoaError
    from cocoa.model.collate import CollateError, EmbedCollator, Stage2Collator, load_image
    from cocoa.records import MixRecord

    with pytest.raises(CollateError, match=r"4000x10 pixels \(aspect ratio 400:1\)"):  # train's load(): a bad row
        load_image(Image.new("RGB", (4000, 10)), where="record r1 qry_image")
    load_image(Image.new("RGB", (2000, 10)))  # 200:1 is what the processor still takes
    proc = AutoProcessor.from_pretrained(tiny_model_dir)
    col = EmbedCollator(proc)
    with pytest.raises(CollateError, match=r"embedding item 0 text contains the special token '<\|vision_start\|>'"):
        col([("a <|vision_start|> b", None)])
    s2 = Stage2Collator(proc)
    rec = MixRecord.model_construct(id="r9", prompt="describe", text="a <|image_pad|> caption", image=None)
    with pytest.raises(CocoaError, match=r"record r9 text contains the special token '<\|image_pad\|>'"):
        s2.check_record(rec)


def test_embedder_edges_are_one_clear_line(tiny_model_dir, tmp_path):
    from PIL import Image

    from cocoa import Embedder
    from cocoa.errors import CocoaError

    emb = Embedder.from_pretrained(tiny_model_dir, device="cpu")
    with pytest.raises(CocoaError, match=r"input 1 image is 4000x10 pixels"):
        emb.encode(images=[Image.new("RGB", (64, 64)), Image.new("RGB", (4000, 10))])
    with pytest.raises(CocoaError, match=r"input 0 text contains the special token '<\|image_pad\|>'"):
        emb.encode(texts=["<|image_pad|><|image_pad|> hi <|vision_start|>"])
    with pytest.raises(CocoaError, match="is a directory, not an image file"):
        emb.encode(images=[str(tmp_path)])
    with pytest.raises(ValueError, match="texts is bytes"):
        emb.encode(texts=b"abc")
    with pytest.raises(ValueError, match=r"texts\[0\] is not valid Unicode"):
        emb.encode(texts=["a\ud800b"])
    assert emb.encode(texts=[]).shape == (0, emb.dim) and emb.dim > 0


@pytest.mark.parametrize("device", ["bogus", "cuda:99", "npu"])
def test_a_bad_device_is_refused_up_front_even_with_a_warm_cache(tiny_model_dir, scenes_root, tmp_path, device):
    from cocoa.errors import CocoaError
    from cocoa.eval import evaluate

    with pytest.raises(CocoaError, match="--device"):
        evaluate(tiny_model_dir, "scenes", data=scenes_root, cache_dir=tmp_path / "cache", device=device, write=False,
                 quiet=True, limit=1, datasets=["nonexistent-is-never-reached"])
    assert not (tmp_path / "cache").exists()


def test_missing_tokenizer_files_are_named(tiny_model_dir, tmp_path):
    import shutil

    from cocoa.errors import CocoaError
    from cocoa.model.embedder import resolve_spec

    m = tmp_path / "m"
    shutil.copytree(tiny_model_dir, m)
    (m / "tokenizer.json").unlink()
    (m / "tokenizer_config.json").unlink()
    with pytest.raises(CocoaError, match="has no tokenizer files"):
        resolve_spec(m)


def test_mmeb_messages_name_cocoa_evals_image_dir_flag(tmp_path):
    from cocoa.errors import CocoaError
    from cocoa.eval.data import load_mmeb

    (tmp_path / "d").mkdir()
    with pytest.raises(CocoaError) as e:
        load_mmeb(tmp_path / "d")
    assert "--mmeb-image-dir" in str(e.value) and "(or --image-dir)" not in str(e.value), e.value
