"""`cocoa-data synth` orchestration: outputs, keys, resume, work split, quarantine, sources."""

import json
from collections import Counter

import pytest
from click.testing import CliRunner

from cocoa.cli.data import cli
from cocoa.datagen.synth import SynthConfig, merge_parts, part_name, partition, request_key, run_synth
from cocoa.records import ImageRef, PairRecord
from cocoa.shards import ShardError, open_dataset, write_records


def synth(*args):
    r = CliRunner().invoke(cli, ["synth", "--no-progress", *args], catch_exceptions=False)
    return r


def _summary(output: str) -> dict:
    line = [x for x in output.splitlines() if x.startswith('{"summary"')][-1]
    return json.loads(line)["summary"]


def _ids(path):
    return sorted(r.id for r in open_dataset(path))


@pytest.fixture(scope="module")
def scenes_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "shards"
    r = synth("--source", "scenes", "--scenes-n", "24", "--out", str(out), "--commit-every", "8", "--batch-size", "4")
    assert r.exit_code == 0, r.output
    return out, _summary(r.output)


def test_scenes_run_writes_original_synthetic_and_hf_opens_them(scenes_run):
    out, s = scenes_run
    assert s["complete"] and s["pairs"] == 24 and s["originals"] == 24 and s["quarantined"] == 0
    orig, syn = open_dataset(out / "original"), open_dataset(out / "synthetic")
    assert orig.manifest.complete and syn.manifest.complete and open_dataset(out / "synthetic" / "quarantine").manifest.complete
    assert len(orig) == 24
    recs = list(syn)
    kinds = Counter(r.kind for r in recs)
    assert kinds["caption"] == s["records"]["caption"] and kinds["qa"] == s["records"]["qa"]
    assert s["ok"] == 2 * kinds["caption"]  # one caption request and one QA request per unique image
    assert kinds["qa"] == 3 * kinds["caption"]  # k=3 pairs per image (scenes graphs always have >= 3 facts)
    parents = {p.id for p in orig}
    for r in recs:
        assert r.parent_id in parents and r.teacher.backend == "scenes" and len(r.template.hash) == 16
        assert r.template.name in ("caption_natural", "qa_natural") and r.image.stored and r.image.load(out / "synthetic").size[0] > 0
    # one request per (unique image, task): keys are unique per caption, shared by a request's QA rows
    cap_keys = [r.key for r in recs if r.kind == "caption"]
    assert len(cap_keys) == len(set(cap_keys))
    assert all(n == 3 for n in Counter(r.key for r in recs if r.kind == "qa").values())
    assert len({r.id for r in recs}) == len(recs)
    # several small commits happened
    assert len(syn.manifest.shards) > 2
    hf = syn.to_hf()
    assert hf.num_rows == len(recs) and hf[0]["image"].size[0] > 0
    assert orig.to_hf().num_rows == 24


def test_rerun_does_no_new_work(scenes_run):
    out, s = scenes_run
    before = (_ids(out / "synthetic"), _ids(out / "original"))
    r = synth("--source", "scenes", "--scenes-n", "24", "--out", str(out))
    s2 = _summary(r.output)
    assert r.exit_code == 0 and s2["ok"] == 0 and s2["skipped"] == s["requests"] and s2["originals"] == 0
    assert s2["complete"] and (_ids(out / "synthetic"), _ids(out / "original")) == before


def test_changed_settings_are_refused_then_overwrite_starts_over(scenes_run, tmp_path):
    out, _ = scenes_run
    r = CliRunner().invoke(cli, ["synth", "--no-progress", "--source", "scenes", "--scenes-n", "24", "--out", str(out),
                                 "--qa-per-image", "2"])
    assert r.exit_code == 1 and "qa_per_image" in r.output and "--overwrite" in r.output
    r = CliRunner().invoke(cli, ["synth", "--no-progress", "--source", "scenes", "--scenes-n", "4", "--out",
                                 str(tmp_path / "o"), "--shard-index", "2", "--num-shards", "2"])
    assert r.exit_code == 2 and "shard_index" in r.output


def test_dry_run_renders_prompts_and_writes_nothing(tmp_path):
    r = synth("--source", "scenes", "--scenes-n", "5", "--out", str(tmp_path / "o"), "--dry-run", "--show", "2")
    assert r.exit_code == 0, r.output
    assert "Write one fine-grained caption" in r.output and "dry run: 5 pairs" in r.output
    assert not (tmp_path / "o").exists()


def test_work_split_is_disjoint_complete_and_equals_one_worker(scenes_run, tmp_path):
    out1, _ = scenes_run
    out = tmp_path / "split"
    for i in range(3):
        r = synth("--source", "scenes", "--scenes-n", "24", "--out", str(out), "--shard-index", str(i), "--num-shards", "3")
        assert r.exit_code == 0, r.output
        if i < 2:  # other workers still missing: readers refuse the aggregate
            with pytest.raises(ShardError, match="incomplete"):
                open_dataset(out / "synthetic")
    parts = sorted(p.name for p in (out / "synthetic" / "parts").iterdir())
    assert parts == [part_name(i, 3) for i in range(3)]
    per_part = [set(r.key for r in open_dataset(out / "synthetic" / "parts" / p)) for p in parts]
    assert not (per_part[0] & per_part[1]) and not (per_part[1] & per_part[2]) and not (per_part[0] & per_part[2])
    assert _ids(out / "synthetic") == _ids(out1 / "synthetic")
    assert _ids(out / "original") == _ids(out1 / "original")


def test_partition_and_keys():
    keys = [request_key(f"img{i}", "p", "t", "m", "", {"seed": 0}, "s", "caption") for i in range(300)]
    assert len(set(keys)) == 300
    for n in (1, 2, 5):
        owners = [partition(k, n) for k in keys]
        assert set(owners) == set(range(n))  # every worker gets work; each key exactly one owner
    base = dict(image_digest="d", prompt="p", template_hash="t", model="m", revision="", params={"seed": 0},
                schema="s", task="caption")
    k0 = request_key(**base)
    for field, value in [("image_digest", "e"), ("prompt", "q"), ("template_hash", "u"), ("model", "n"),
                         ("revision", "r1"), ("params", {"seed": 1}), ("schema", "z"), ("task", "qa")]:
        assert request_key(**{**base, field: value}) != k0, field


def test_duplicate_images_make_one_request_and_unusable_records_are_quarantined(tmp_path):
    from cocoa.sources.scenes import iter_train_pairs

    good = [p for p in iter_train_pairs(6, seed=1) if p.qry_image is not None][:2]
    # same image as good[0] with other texts -> no new request; a record without a scene graph -> rejected;
    # a corrupt image -> quarantined as unreadable
    dup = PairRecord(source=good[0].source, qry_text="another query", qry_image=good[0].qry_image,
                     pos_text="another text", meta=good[0].meta)
    nograph = PairRecord(source="Other", qry_image=good[1].qry_image.model_copy(update={"bytes": good[1].qry_image.bytes + b"x"}),
                         pos_text="a text", meta={})
    corrupt = PairRecord(source="Other", qry_image=ImageRef(bytes=b"\x89PNG\r\n\x1a\nnot really"), pos_text="t")
    src = tmp_path / "src"
    write_records(src, "PairRecord", good + [dup, nograph, corrupt])
    cfg = SynthConfig(source="scenes", scenes_dir=str(src), out=str(tmp_path / "o"), progress=False)
    s = run_synth(cfg)
    # 4 images x (caption, qa); the duplicate adds nothing; the pair with the corrupt image is quarantined
    # too (not copied into original/)
    assert s.pairs == 5 and s.requests == 8 and s.ok == 4 and s.quarantined == 5 and s.complete
    assert s.originals == 4 and corrupt.id not in {p.id for p in open_dataset(tmp_path / "o" / "original")}
    rows = list(open_dataset(tmp_path / "o" / "synthetic" / "quarantine"))
    assert Counter(r.reason for r in rows) == {"rejected": 2, "image_unreadable": 3}
    assert {r.meta["task"] for r in rows if "task" in r.meta} == {"caption", "qa"}
    q = {r.reason: r for r in rows}
    assert "scene graph" in q["rejected"].detail and q["image_unreadable"].stage == "source"
    assert "corrupt" in q["image_unreadable"].detail or "cannot be decoded" in q["image_unreadable"].detail
    assert q["rejected"].meta["template"]["hash"] and q["rejected"].key
    # rerun: quarantined keys count as done too
    s2 = run_synth(cfg)
    assert s2.ok == 0 and s2.quarantined == 0 and s2.skipped == 8


def test_prompts_override_changes_keys_and_template_hash(tmp_path):
    tdir = tmp_path / "tpl"
    tdir.mkdir()
    (tdir / "caption_natural.j2").write_text("Caption this {{ kind }} image from {{ dataset }} as JSON.")
    base = dict(source="scenes", scenes_n=3, tasks=["caption"], progress=False)
    a = run_synth(SynthConfig(out=str(tmp_path / "a"), **base))
    b = run_synth(SynthConfig(out=str(tmp_path / "b"), prompts=str(tdir), **base))
    assert a.ok == b.ok > 0
    ra, rb = list(open_dataset(tmp_path / "a" / "synthetic")), list(open_dataset(tmp_path / "b" / "synthetic"))
    assert {r.template.hash for r in ra}.isdisjoint({r.template.hash for r in rb})
    assert {r.key for r in ra}.isdisjoint({r.key for r in rb})


def test_existing_original_from_another_command_is_used_as_input(tmp_path):
    from cocoa.sources.scenes import iter_train_pairs

    out = tmp_path / "ws"
    write_records(out / "original", "PairRecord", iter_train_pairs(4, seed=2))
    before = open_dataset(out / "original").manifest.model_dump()
    s = run_synth(SynthConfig(source="scenes", out=str(out), tasks=["caption"], progress=False))
    assert s.complete and s.originals == 0 and s.ok > 0
    assert open_dataset(out / "original").manifest.model_dump() == before


def test_mmeb_source_with_the_transformers_teacher(tmp_path, tiny_model_dir):
    from cocoa.testing.mmeb import write_mmeb_train_fixture

    root = write_mmeb_train_fixture(tmp_path / "mmeb", subsets=["ImageNet_1K", "MSCOCO_t2i"], n_per_subset=2)
    r = synth("--source", "mmeb", "--mmeb-dir", str(root), "--out", str(tmp_path / "o"), "--backend", "transformers",
              "--model", str(tiny_model_dir), "--device", "cpu", "--tasks", "caption", "--max-tokens", "6",
              "--max-retries", "1", "--max-per-subset", "1")
    assert r.exit_code == 0, r.output
    s = _summary(r.output)
    assert s["pairs"] == 2 and s["requests"] == 2 and s["complete"]
    orig = list(open_dataset(tmp_path / "o" / "original"))
    assert {p.source for p in orig} == {"ImageNet_1K", "MSCOCO_t2i"}
    # the random tiny model does not write JSON: every output is quarantined with its raw text, never dropped
    q = list(open_dataset(tmp_path / "o" / "synthetic" / "quarantine"))
    assert s["ok"] + s["quarantined"] == 2 and len(q) == s["quarantined"] >= 1
    for row in q:
        assert row.stage == "synth" and row.reason in ("invalid_json", "empty", "schema")
        assert row.meta["attempts"] == 2 and len(row.meta["raws"]) == 2 and row.raw == row.meta["raws"][-1]
        assert row.meta["teacher"]["backend"] == "transformers"


def test_mmeb_without_vllm_names_the_alternatives(tmp_path):
    from cocoa.datagen.synth import vllm_available

    if vllm_available():
        pytest.skip("vLLM is installed: the default backend exists")
    r = CliRunner().invoke(cli, ["synth", "--source", "mmeb", "--mmeb-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--backend openai --base-url" in r.output and "--backend transformers --model" in r.output


def test_merge_parts_marks_incomplete_until_all_parts_complete(tmp_path):
    from cocoa.shards import ShardWriter

    d = tmp_path / "syn"
    w = ShardWriter(d / "parts" / part_name(0, 2), "QuarantineRecord", mode="append")
    assert not merge_parts(d, "QuarantineRecord", 2).complete
    w.close()
    assert not merge_parts(d, "QuarantineRecord", 2).complete  # part 1 missing
    ShardWriter(d / "parts" / part_name(1, 2), "QuarantineRecord", mode="append").close()
    assert merge_parts(d, "QuarantineRecord", 2).complete and open_dataset(d).manifest.complete
