"""Two processes (`torchrun --nproc_per_node 2`, gloo on CPU): the stage-3 loss and gradients equal a single
process's on the same global batch, so cross-rank negatives really are used; the real training loop
under torchrun gives the single-process loss sequence."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest

from train_support import losses, make_workspace, subprocess_env

GLOBAL = 8  # global contrastive batch
CHUNK = 2  # GradCache chunk per rank

WORKER = r'''
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, sys.argv[4])
from test_train_distributed import stage3_grads, train_config  # noqa: E402

from cocoa.train import distributed as D  # noqa: E402
from cocoa.train.run import run_training  # noqa: E402

ws, model_dir, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
info = D.init()
assert info.world == 2 and info.backend == "gloo", info
loss, acc, grads = stage3_grads(ws, model_dir, info, ddp=True)
if info.rank == 0:
    torch.save({"loss": loss, "acc": acc, "grads": grads}, out / "grads.pt")
D.barrier(info)
run_training(train_config(ws, model_dir, out / "run"))
'''


def train_config(ws, model_dir, out):
    from cocoa.train.config import TrainConfig

    return TrainConfig.build({
        "stages": "3", "data": str(ws), "model": str(model_dir), "out": str(out), "preset": "tiny", "progress": False,
        "stage3": {"steps": 2, "batch_size": GLOBAL, "micro_batch_size": CHUNK, "lr": 1e-3, "warmup_ratio": 0,
                   "schedule": "constant", "max_length": 128},
    })


def stage3_grads(ws, model_dir, info, ddp):
    """Loss, accuracy and parameter gradients of one stage-3 GradCache step through the training loop's own
    code (`_stage3_step`, DDP wrapping) on this rank's slice of a fixed global batch."""
    import torch

    from cocoa.train import distributed as D
    from cocoa.model.collate import EmbedCollator
    from cocoa.train.config import resolve_preset
    from cocoa.train.data import ArrowRecords, rank_slice
    from cocoa.train.method import dispatch_module as _dispatch_module, load_cocoa_model as _load_cocoa_model, \
        stage3_step as _stage3_step

    cfg = resolve_preset(train_config(ws, model_dir, Path("unused")))
    model = _load_cocoa_model(str(model_dir), cfg, 3, info.device, torch.float32)
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    wrapped = D.wrap_model(_dispatch_module(model), info, "ddp", True) if ddp else model_call(model)
    recs = ArrowRecords(Path(ws) / "original")
    rows = [recs[i] for i in rank_slice(list(range(GLOBAL)), info.rank, info.world)]
    col = EmbedCollator(model.processor, model.spec, max_length=128, image_root=recs.root)
    chunks = [rows[s:s + CHUNK] for s in range(0, len(rows), CHUNK)]
    groups = [[col([(r.qry_text, r.qry_image) for r in c]) for c in chunks],
              [col([(r.pos_text, r.pos_image) for r in c]) for c in chunks]]
    loss, parts, _, _ = _stage3_step(wrapped, model, groups, cfg, info, nullcontext())
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss, parts["acc"], grads


def model_call(model):
    def call(method, *a, **kw):
        return getattr(model, method)(*a, **kw)
    return call


@pytest.fixture(scope="module")
def ws(scenes_root, tmp_path_factory):
    return make_workspace(scenes_root, tmp_path_factory.mktemp("dist-ws"))


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun is not installed")
def test_two_processes_match_one_process(ws, tiny_model_dir, tmp_path):
    import torch

    from cocoa.train import distributed as D

    out = tmp_path / "dist"
    out.mkdir()
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(worker), str(ws), str(tiny_model_dir),
                        str(out), str(Path(__file__).parent)],
                       env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    dist = torch.load(out / "grads.pt")

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = stage3_grads(ws, tiny_model_dir, D.DistInfo(), ddp=False)
        # what a rank would compute WITHOUT the other rank's negatives (its 4 pairs alone)
        local = stage3_grads_local(ws, tiny_model_dir)
        from cocoa.train.run import run_training

        run_training(train_config(ws, tiny_model_dir, tmp_path / "single"))
    finally:
        torch.set_num_threads(n)
    loss1, acc1, g1 = single
    assert dist["loss"] == pytest.approx(loss1, rel=1e-5)
    assert abs(local - loss1) > 1e-3  # the global loss differs from a per-rank (4-pair) loss
    assert set(dist["grads"]) == set(g1)
    for name, g in g1.items():
        torch.testing.assert_close(dist["grads"][name], g, rtol=1e-3, atol=1e-6, msg=name)
    # the real loop under torchrun: same loss sequence as one process with the same global batch
    assert losses(out / "run", 3) == pytest.approx(losses(tmp_path / "single", 3), rel=1e-4)
    assert json.loads((out / "run" / "stage3" / "summary.json").read_text())["steps"] == 2
    assert (out / "run" / "stage3" / "checkpoints" / "step-00000002" / "rng-rank1.pt").is_file()


def stage3_grads_local(ws, model_dir):
    """The InfoNCE loss of rank 0's 4 pairs alone (in-batch negatives from those 4 only)."""
    import torch

    from cocoa.model.collate import EmbedCollator
    from cocoa.train.data import ArrowRecords
    from cocoa.model.wrapper import CocoaModel
    from cocoa.model.objectives import info_nce

    m = CocoaModel.from_pretrained(model_dir)
    recs = ArrowRecords(Path(ws) / "original")
    rows = [recs[i] for i in range(GLOBAL // 2)]
    col = EmbedCollator(m.processor, m.spec, max_length=128, image_root=recs.root)
    with torch.no_grad():
        q = m.embed(col([(r.qry_text, r.qry_image) for r in rows]), "bidirectional")
        t = m.embed(col([(r.pos_text, r.pos_image) for r in rows]), "bidirectional")
    return float(info_nce(q, t, temperature=0.05, gather=False)[0])
