"""End to end on CPU with the tiny model: `cocoa-train --stages 1,2,3` (losses go down, outputs load with
from_pretrained), DoRA adapters merged into a plain checkpoint, and kill-and-resume with a real SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from train_support import PYTHON, losses, make_workspace, subprocess_env


@pytest.fixture(scope="module")
def ws(scenes_root, tmp_path_factory):
    return make_workspace(scenes_root, tmp_path_factory.mktemp("train-ws"))




def _mean(xs):
    return sum(xs) / len(xs)


def _fixed_batch_losses(model_dir, ws, k):
    """Stage ``k``'s loss on a fixed batch (same records, same masks) for the model in ``model_dir``."""
    import torch

    from cocoa.model.collate import EmbedCollator, Stage1Collator, Stage2Collator
    from cocoa.train.data import ArrowRecords
    from cocoa.model.wrapper import CocoaModel
    from cocoa.model.objectives import info_nce

    m = CocoaModel.from_pretrained(model_dir, load_image_decoder=False).eval()
    with torch.no_grad():
        if k == 3:
            recs = ArrowRecords(ws / "original")
            rows = [recs[i] for i in range(16)]
            c = EmbedCollator(m.processor, m.spec, max_length=256, image_root=recs.root)
            q = m.embed(c([(r.qry_text, r.qry_image) for r in rows]), "bidirectional")
            t = m.embed(c([(r.pos_text, r.pos_image) for r in rows]), "bidirectional")
            return float(info_nce(q, t, temperature=0.05, gather=False)[0])
        recs = ArrowRecords(ws / "mix")
        rows = [recs[i] for i in range(16)]
        if k == 1:
            b = Stage1Collator(m.processor, m.spec, max_length=256, image_root=recs.root, seed=5)(rows)
            return float(m.stage1_loss(b, mae_weight=0.0)[0])  # MNTP part (the MAE decoder is not saved)
        b = Stage2Collator(m.processor, m.spec, max_length=256, image_root=recs.root, seed=5)(rows)
        return float(m.stage2_loss(b)[0])


def test_three_stages_end_to_end(ws, tiny_model_dir, tmp_path, one_thread):
    import torch

    from cocoa.cli.train import cli
    from cocoa.model.wrapper import CocoaModel

    out = tmp_path / "run"
    args = ["--stages", "1,2,3", "--data", str(ws), "--model", str(tiny_model_dir), "--out", str(out),
            "--preset", "tiny", "--no-progress"]
    for k, lr in ((1, "1e-3"), (2, "3e-4"), (3, "1e-4")):
        args += [f"--stage{k}-steps", "8", f"--stage{k}-batch-size", "8", f"--stage{k}-micro-batch-size", "4",
                 f"--stage{k}-lr", lr, f"--stage{k}-warmup-ratio", "0", f"--stage{k}-schedule", "constant"]
    args += ["--stage3-batch-size", "16", "--stage3-micro-batch-size", "8", "--stage2-save-every", "4"]
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    inputs = {1: tiny_model_dir, 2: out / "stage1" / "model", 3: out / "stage2" / "model"}
    for k in (1, 2, 3):
        ls = losses(out, k)
        assert len(ls) == 8, (k, ls)
        # each stage's loss goes down: on a fixed batch (same rows, same masks), before vs after the stage
        before = _fixed_batch_losses(inputs[k], ws, k)
        after = _fixed_batch_losses(out / f"stage{k}" / "model", ws, k)
        assert after < 0.95 * before, (k, before, after, ls)
        sd = out / f"stage{k}"
        assert (sd / "loss.png").stat().st_size > 1000
        summ = json.loads((sd / "summary.json").read_text())
        assert 0.0 <= summ["padding_share"] < 0.5 and summ["steps"] == 8
        assert (sd / "checkpoints" / "step-00000008" / "state.json").is_file()
    assert (out / "stage2" / "checkpoints" / "step-00000004" / "state.json").is_file()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "tokens_per_s", "padding_share", "grad_norm"} <= set(rows[0])
    assert "loss_mntp" in rows[0] and "loss_mae" in rows[0]  # stage 1 reports both parts
    mae = [r["loss_mae"] for r in rows if r["stage"] == 1]
    assert _mean(mae[-3:]) < _mean(mae[:3]), mae
    # the outputs load with from_pretrained (ours and plain transformers), chained stage by stage
    m = CocoaModel.from_pretrained(out / "stage3" / "model")
    assert m.spec.stages == [1, 2, 3] and m.spec.attention == "bidirectional"
    from transformers import AutoModelForImageTextToText

    hf = AutoModelForImageTextToText.from_pretrained(out / "stage3" / "model")
    s2 = AutoModelForImageTextToText.from_pretrained(out / "stage2" / "model")
    w3, w2 = hf.state_dict(), s2.state_dict()
    assert any(not torch.equal(w3[k], w2[k]) for k in w3)  # stage 3 trained on top of stage 2
    from cocoa.model.collate import EmbedCollator

    batch = EmbedCollator(m.processor, m.spec)([("a red circle", None), ("a blue square", None)])
    with torch.no_grad():
        e = m.embed(batch)
    assert e.shape[0] == 2 and torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-4)
    # rerunning the finished run is a no-op (every stage already has its model)
    r2 = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r2.exit_code == 0 and len(losses(out, 3)) == 8


def test_dora_adapters_are_merged_into_a_plain_checkpoint(ws, tiny_model_dir, tmp_path, one_thread):
    import torch
    from safetensors.torch import load_file

    from cocoa.train.config import TrainConfig
    from cocoa.train.run import run_training

    out = tmp_path / "dora"
    cfg = TrainConfig.build({
        "stages": "3", "data": str(ws), "model": str(tiny_model_dir), "out": str(out), "preset": "paper",
        "progress": False, "lora": {"method": "dora", "r": 4, "alpha": 32},
        "stage3": {"steps": 2, "batch_size": 8, "micro_batch_size": 4, "lr": 1e-2, "max_length": 128,
                   "warmup_ratio": 0, "temperature": 0.05, "image_max_pixels": 112 * 112},
    })
    res = run_training(cfg)
    saved = load_file(str(Path(res["stages"][3]) / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert not any("lora" in k for k in saved) and set(saved) == set(base)
    changed = [k for k in base if not torch.equal(base[k], saved[k])]
    assert any("visual" in k and "qkv" in k for k in changed) and any("q_proj" in k for k in changed)
    assert not any("embed_tokens" in k for k in changed)  # not a target: frozen
    ck = load_file(str(out / "stage3" / "checkpoints" / "step-00000002" / "weights.safetensors"))
    assert ck and all("lora" in k for k in ck)  # checkpoints hold the adapter only


def _cli_args(ws, model, out, extra=()):
    return ["--stages", "1", "--data", str(ws), "--model", str(model), "--out", str(out), "--preset", "tiny",
            "--no-progress", "--stage1-steps", "5", "--stage1-batch-size", "8", "--stage1-micro-batch-size", "4",
            "--stage1-save-every", "2", "--stage1-lr", "1e-3", *extra]


def _cli_cmd(ws, model, out, extra=()):
    return [PYTHON, "-m", "cocoa.cli.train", *_cli_args(ws, model, out, extra)]


def test_sigkill_and_resume_gives_the_uninterrupted_losses(ws, tiny_model_dir, tmp_path, one_thread):
    from cocoa.cli.train import cli

    env = subprocess_env()
    # the uninterrupted reference run (in this process, one thread like the subprocesses)
    ref = tmp_path / "ref"
    r = CliRunner().invoke(cli, _cli_args(ws, tiny_model_dir, ref), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    want = losses(ref, 1)
    assert len(want) == 5
    # a run killed with SIGKILL right after its first complete checkpoint
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli_cmd(ws, tiny_model_dir, out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    ck = out / "stage1" / "checkpoints" / "step-00000002" / "state.json"
    t0 = time.time()
    while not ck.is_file():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() - t0 < 240, "no checkpoint appeared"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "stage1" / "model").exists()
    done_before = len(losses(out, 1))
    assert 2 <= done_before < 5
    r = subprocess.run(_cli_cmd(ws, tiny_model_dir, out, ["--resume", "auto"]), env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "step-0000000" in r.stderr
    got = losses(out, 1)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7), (got, want)
    assert (out / "stage1" / "model" / "cocoa.json").is_file()
