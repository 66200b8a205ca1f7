"""The evaluator end to end on the scenes benchmark with the tiny model: cache, resume, CLI, bad input."""

import shutil

import numpy as np
import pytest
from click.testing import CliRunner

DS = ["SceneCls", "SceneT2I"]


@pytest.fixture
def count_forwards(monkeypatch):
    """Count real forward passes of CocoaModel.embed (the model still runs)."""
    from cocoa.model.wrapper import CocoaModel

    calls = {"batches": 0, "items": 0}
    orig = CocoaModel.embed

    def counting(self, batch, *a, **kw):
        calls["batches"] += 1
        calls["items"] += int(batch["input_ids"].shape[0])
        return orig(self, batch, *a, **kw)

    monkeypatch.setattr(CocoaModel, "embed", counting)
    return calls


def test_cache_reruns_and_added_datasets_encode_only_what_is_new(tiny_model_dir, scenes_root, tmp_path, count_forwards):
    from cocoa.eval import evaluate

    kw = dict(data=scenes_root, limit=3, cache_dir=tmp_path / "cache", quiet=True, batch_size=8, plot=False)
    r1 = evaluate(tiny_model_dir, "scenes", datasets=DS, out=tmp_path / "r1", **kw)
    n1 = r1.encode["unique_inputs"]
    assert r1.encode["encoded"] == n1 == count_forwards["items"] > 0
    # candidates shared across queries are encoded once: far fewer inputs than (query + candidates) per record
    occurrences = sum(d.n * (1 + d.n_candidates) for d in r1.datasets.values())
    assert n1 < occurrences
    # second run: nothing encoded, model never called, identical scores
    count_forwards.update(batches=0, items=0)
    r2 = evaluate(tiny_model_dir, "scenes", datasets=DS, out=tmp_path / "r2", **kw)
    assert count_forwards["batches"] == 0 and r2.encode["encoded"] == 0 and r2.encode["cached"] == n1
    assert r2.datasets == r1.datasets and r2.overall == r1.overall
    # an added dataset costs only its own new inputs
    r3 = evaluate(tiny_model_dir, "scenes", datasets=DS + ["SceneVQA"], out=tmp_path / "r3", **kw)
    assert r3.encode["encoded"] == r3.encode["unique_inputs"] - n1 == count_forwards["items"] > 0
    assert {k: r3.datasets[k] for k in DS} == r1.datasets

    # a changed model (weights) has another hash: everything is encoded again, and differently
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other_model"
    shutil.copytree(tiny_model_dir, other)
    sd = load_file(str(other / "model.safetensors"))
    name = next(k for k in sd if "embed_tokens" in k)
    sd[name] = sd[name] + 0.5 * sd[name].std() * np.random.default_rng(0).standard_normal(sd[name].shape).astype("float32")
    save_file(sd, str(other / "model.safetensors"), metadata={"format": "pt"})
    count_forwards.update(batches=0, items=0)
    r4 = evaluate(other, "scenes", datasets=DS, out=tmp_path / "r4", **kw)
    assert r4.model_hash != r1.model_hash
    assert r4.encode["encoded"] == n1 == count_forwards["items"]
    # so does a pooling override (it is part of the hash)
    r5 = evaluate(tiny_model_dir, "scenes", datasets=DS[:1], out=tmp_path / "r5", pooling="mean", **kw)
    assert r5.model_hash not in (r1.model_hash, r4.model_hash) and r5.encode["cached"] == 0
    # a loaded Embedder is the same model as its directory: same hash, all cached
    from cocoa import Embedder

    count_forwards.update(batches=0, items=0)
    r6 = evaluate(Embedder.from_pretrained(tiny_model_dir, device="cpu"), "scenes", datasets=DS, out=tmp_path / "r6", **kw)
    assert r6.model_hash == r1.model_hash and r6.encode["encoded"] == 0 == count_forwards["batches"]


def test_interrupted_run_resumes_from_the_cache(tiny_model_dir, scenes_root, tmp_path, count_forwards, monkeypatch):
    from cocoa.eval import evaluate
    from cocoa.model.wrapper import CocoaModel

    kw = dict(data=scenes_root, datasets=["SceneI2T"], limit=3, cache_dir=tmp_path / "cache", quiet=True,
              batch_size=4, flush_every=4, out=tmp_path / "out", plot=False)
    counted = CocoaModel.embed

    def dies_on_third(self, batch, *a, **k):
        if count_forwards["batches"] >= 2:
            raise KeyboardInterrupt("simulated kill")
        return counted(self, batch, *a, **k)

    monkeypatch.setattr(CocoaModel, "embed", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny_model_dir, "scenes", **kw)
    done = count_forwards["items"]
    assert done == 8
    chunks = list((tmp_path / "cache").rglob("chunk-*.keys"))
    assert len(chunks) == 2 and not list((tmp_path / "cache").rglob(".*tmp*"))
    monkeypatch.setattr(CocoaModel, "embed", counted)
    count_forwards.update(batches=0, items=0)
    r = evaluate(tiny_model_dir, "scenes", **kw)
    assert r.encode["cached"] == done and r.encode["encoded"] == r.encode["unique_inputs"] - done == count_forwards["items"]


def test_cli_scenes_table_reports_and_compare(tiny_model_dir, scenes_root, tmp_path):
    from cocoa.cli.eval import cli
    from cocoa.eval import EvalResult

    base = ["--model", str(tiny_model_dir), "--benchmark", "scenes", "--data", str(scenes_root / "eval"),
            "--limit", "2", "--cache-dir", str(tmp_path / "cache"), "--batch-size", "8"]
    r = CliRunner().invoke(cli, base + ["--datasets", "SceneGround,SceneGround-OOD", "--out", str(tmp_path / "a"),
                                        "--label", "before"], terminal_width=200)
    assert r.exit_code == 0, r.output
    for row in ("SceneGround", "SceneGround-OOD", "Classification", "VQA", "Retrieval", "Grounding", "IND", "OOD",
                "Overall"):
        assert row in r.output
    assert {p.name for p in (tmp_path / "a").iterdir()} >= {"results.json", "results.md", "results.png"}
    res = EvalResult.load(tmp_path / "a" / "results.json")
    assert set(res.datasets) == {"SceneGround", "SceneGround-OOD"} and res.meta_tasks["vqa"] is None
    assert res.splits["IND"] == res.datasets["SceneGround"].p_at_1 and res.encode["encoded"] > 0
    md = (tmp_path / "a" / "results.md").read_text()
    assert "| **Classification** | Classification |  | 0 ds | - |" in md

    # YAML config + --compare
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\nbenchmark: scenes\ndata: {scenes_root}\nlimit: 2\n"
                   f"cache_dir: {tmp_path / 'cache'}\ndatasets: [SceneGround]\nplot: false\n")
    r = CliRunner().invoke(cli, ["--config", str(cfg), "--out", str(tmp_path / "b"), "--compare",
                                 str(tmp_path / "a" / "results.json")], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "Before" in r.output and "+0.0" in r.output and "0 encoded" in r.output
    assert not (tmp_path / "b" / "results.png").exists()
    assert "Δ" in (tmp_path / "b" / "results.md").read_text()


def test_cli_bad_input(tiny_model_dir, scenes_root, tmp_path):
    from cocoa.cli.eval import cli
    from cocoa.shards import ShardWriter

    run = lambda *a: CliRunner().invoke(cli, list(a), terminal_width=200)  # noqa: E731
    common = ["--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--limit", "1"]

    # model dir without cocoa.json: a clear error naming the file and the flags; the flags make it work
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "cocoa.json").unlink()
    r = run("--model", str(bare), "--data", str(scenes_root), *common)
    assert r.exit_code == 1 and "cocoa.json" in r.output and "--pooling" in r.output and "Traceback" not in r.output
    r = run("--model", str(bare), "--data", str(scenes_root), "--datasets", "SceneCls", "--pooling", "eos",
            "--eos-token", "<|endoftext|>", *common)
    assert r.exit_code == 0, r.output

    # unknown dataset: the known ones are listed
    r = run("--model", str(tiny_model_dir), "--data", str(scenes_root), "--datasets", "SceneCls,NoSuchSet", *common)
    assert r.exit_code == 1 and "'NoSuchSet'" in r.output and "SceneCls-OOD" in r.output and "SceneVQA" in r.output

    # flag problems are usage errors
    assert run("--data", str(scenes_root)).exit_code == 2
    r = run("--model", str(tiny_model_dir), "--benchmark", "mmeb")
    assert r.exit_code == 2 and "--mmeb-dir" in r.output
    r = run("--model", str(tiny_model_dir), "--data", str(tmp_path / "nowhere"), *common)
    assert r.exit_code == 1 and "does not exist" in r.output

    # a candidate list with an empty positive (written raw, as a foreign tool could): refused, named
    bad_root = tmp_path / "bad" / "eval"
    row = {"id": "r1", "dataset": "Broken", "meta_task": "vqa", "split": "IND", "qry_text": "what colour is it?",
           "qry_image": None, "tgt_texts": ["", "blue", "green"], "tgt_images": [None, None, None], "meta": "{}"}
    with ShardWriter(bad_root / "Broken", "EvalRecord") as w:
        w.write_row(row)
    r = run("--model", str(tiny_model_dir), "--data", str(bad_root.parent), *common)
    assert r.exit_code == 1 and "positive" in r.output and "Broken" in r.output and "row 0" in r.output
