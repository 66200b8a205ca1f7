"""Objectives against hand-computed values on tiny tensors (no model needed)."""

import math
import os
import tempfile

import pytest
import torch
import torch.nn as nn

from cocoa.model.objectives import (
    IGNORE,
    ImageDecoder,
    eos_reconstruction_loss,
    grad_cache_step,
    info_nce,
    mae_loss,
    mae_targets,
    mask_image_units,
    mask_text_tokens,
    merge_unit_counts,
    mntp_loss,
    shifted_positions,
)


class Identity(nn.Module):
    def forward(self, x):
        return x


def test_mntp_loss_hand_computed():
    # hidden states are the logits (identity LM head): vocab 3
    hidden = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [3.0, 1.0, 0.0]]])
    labels = torch.full((1, 4), IGNORE)
    labels[0, 2] = 1  # predicted from position 1: logits [0, 2, 0]
    labels[0, 3] = 0  # predicted from position 2: logits [0, 0, 0]
    ce1 = -(2 - math.log(math.exp(0) + math.exp(2) + math.exp(0)))
    ce2 = math.log(3)
    got = mntp_loss(hidden, labels, Identity())
    assert got.item() == pytest.approx((ce1 + ce2) / 2, rel=1e-6)


def test_label_shift_token_by_token():
    # position i's hidden state is one-hot(i): the logit argmax names the source position exactly
    L = 7
    hidden = torch.eye(L)[None]
    labels = torch.full((1, L), IGNORE)
    labels[0, [2, 5]] = torch.tensor([1, 4])  # stage 1: masked token i predicted from i-1
    b, src, tgt = shifted_positions(labels)
    assert src.tolist() == [1, 4] and tgt.tolist() == [1, 4]
    logits = Identity()(hidden[b, src])
    assert logits.argmax(-1).tolist() == [1, 4]
    # a label at position 0 has no predecessor
    bad = torch.full((1, L), IGNORE)
    bad[0, 0] = 3
    with pytest.raises(ValueError):
        shifted_positions(bad)


def test_stage2_first_b_token_predicted_from_eos():
    # A A EOS B B: eos at 2, the first B token (3) is predicted from the EOS hidden state
    hidden = torch.zeros(1, 5, 5)
    hidden[0, 2, 3] = 50.0  # the EOS state "predicts" token 3 confidently
    labels = torch.full((1, 5), IGNORE)
    labels[0, 3] = 3
    loss = eos_reconstruction_loss(hidden, labels, Identity(), eos_pos=torch.tensor([2]))
    assert loss.item() < 1e-6
    b, src, _ = shifted_positions(labels)
    assert src.tolist() == [2]
    labels_in_a = torch.full((1, 5), IGNORE)
    labels_in_a[0, 1] = 1
    with pytest.raises(ValueError):
        eos_reconstruction_loss(hidden, labels_in_a, Identity(), eos_pos=torch.tensor([2]))


def test_mask_text_tokens_counts_and_never_unmaskable():
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(100, 140).reshape(2, 20)
    maskable = torch.zeros(2, 20, dtype=torch.bool)
    maskable[0, 5:15] = True  # 10 text tokens
    maskable[1, 1:20] = True  # 19 text tokens
    out, labels = mask_text_tokens(ids, maskable, 0.2, mask_token_id=7, generator=g)
    assert int((labels[0] != IGNORE).sum()) == 2 and int((labels[1] != IGNORE).sum()) == 4  # round(0.2 n)
    masked = labels != IGNORE
    assert not bool((masked & ~maskable).any())
    assert torch.equal(out[masked], torch.full((6,), 7))
    assert torch.equal(labels[masked], ids[masked])
    assert torch.equal(out[~masked], ids[~masked])


def _pixels(grids, dim=1176):
    n = sum(int(t * h * w) for t, h, w in grids)
    return torch.arange(n * dim, dtype=torch.float32).reshape(n, dim) / (n * dim)


def test_mask_image_units_whole_units_per_image():
    grid = torch.tensor([[1, 4, 4], [1, 2, 6]])  # 16 and 12 patches -> 4 and 3 units
    assert merge_unit_counts(grid) == [4, 3]
    pv = _pixels(grid.tolist())
    g = torch.Generator().manual_seed(0)
    out, unit_mask = mask_image_units(pv, grid, ratio=0.5, mode="zero", generator=g)
    assert unit_mask.tolist().count(True) == 2 + 2  # round(0.5*4)=2, round(0.5*3)=2
    assert int(unit_mask[:4].sum()) == 2 and int(unit_mask[4:].sum()) == 2
    rows_changed = (out != pv).any(-1).view(-1, 4)  # [units, 4 rows]
    # a unit is either entirely replaced or entirely untouched
    assert torch.equal(rows_changed.all(-1), unit_mask) and torch.equal(rows_changed.any(-1), unit_mask)
    assert bool((out.view(-1, 4, 1176)[unit_mask] == 0).all())
    # mean replacement uses the image's own mean row
    out_m, um = mask_image_units(pv, grid, ratio=0.25, mode="mean", generator=torch.Generator().manual_seed(1))
    first = um[:4].nonzero()[0, 0]
    assert torch.allclose(out_m.view(-1, 4, 1176)[first, 0], pv[:16].mean(0))
    # noise replacement differs from the original
    out_n, un = mask_image_units(pv, grid, ratio=1.0, mode="noise", generator=g)
    assert bool(un.all()) and not torch.allclose(out_n, pv)
    with pytest.raises(ValueError):
        mask_image_units(pv[:-4], grid)


def test_mae_loss_counts_only_masked_units():
    grid = torch.tensor([[1, 2, 4]])  # 2 units
    pv = torch.zeros(8, 1176)
    pv[:4] = 1.0  # unit 0 all ones, unit 1 zeros
    unit_mask = torch.tensor([True, False])
    pred = torch.zeros(2, 4 * 1176)
    assert mae_loss(pred, pv, unit_mask).item() == pytest.approx(1.0)  # (0-1)^2 over unit 0
    pred2 = pred.clone()
    pred2[1] = 123.0  # unmasked unit: must not count
    assert mae_loss(pred2, pv, unit_mask).item() == pytest.approx(1.0)
    pred3 = pred.clone()
    pred3[0] = 0.5
    assert mae_loss(pred3, pv, unit_mask).item() == pytest.approx(0.25)
    # predictions given only for masked units
    assert mae_loss(pred3[:1], pv, unit_mask).item() == pytest.approx(0.25)
    # per-patch normalised targets: each 1176-row has mean 0, var 1
    x = torch.randn(8, 1176) * 3 + 2
    t = mae_targets(x, norm_pix=True).view(8, 1176)
    assert torch.allclose(t.mean(-1), torch.zeros(8), atol=1e-5)
    assert torch.allclose(t.var(-1, unbiased=False), torch.ones(8), atol=1e-3)
    # nothing masked -> 0 with a gradient path
    p = torch.zeros(2, 4 * 1176, requires_grad=True)
    z = mae_loss(p, pv, torch.tensor([False, False]))
    z.backward()
    assert z.item() == 0.0


def test_info_nce_hand_computed():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    tau = 0.5
    s = q @ t.T / tau  # [[1.2, 0], [1.6, 2.0]]
    l0 = -(1.2 - math.log(math.exp(1.2) + math.exp(0.0)))
    l1 = -(2.0 - math.log(math.exp(1.6) + math.exp(2.0)))
    loss, m = info_nce(q, t, temperature=tau)
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    assert m["acc"] == 1.0 and m["n_candidates"] == 2
    # hard negatives are extra candidates for every query
    n = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    l0n = -(1.2 - math.log(math.exp(1.2) + math.exp(0) + math.exp(2.0) + math.exp(-2.0)))
    l1n = -(2.0 - math.log(math.exp(1.6) + math.exp(2.0) + math.exp(0) + math.exp(0)))
    loss_n, mn = info_nce(q, t, temperature=tau, negatives=n)
    assert loss_n.item() == pytest.approx((l0n + l1n) / 2, rel=1e-6)
    assert mn["acc"] == 0.5 and mn["n_candidates"] == 4
    # symmetric: average with the target->query direction
    st = t @ q.T / tau  # [[1.2, 1.6], [0, 2.0]]
    r0 = -(1.2 - math.log(math.exp(1.2) + math.exp(1.6)))
    r1 = -(2.0 - math.log(math.exp(0) + math.exp(2.0)))
    loss_s, _ = info_nce(q, t, temperature=tau, symmetric=True)
    assert loss_s.item() == pytest.approx(0.5 * ((l0 + l1) / 2 + (r0 + r1) / 2), rel=1e-6)
    assert info_nce(q, t)[0].item() == pytest.approx(
        nn.functional.cross_entropy(q @ t.T / 0.02, torch.arange(2)).item()
    )  # temperature 0.02 by default


def _ddp_worker(rank, world, init_file, q, t, n, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    k = q.shape[0] // world
    sl = slice(rank * k, (rank + 1) * k)
    ql, tl, nl = (x[sl].clone().requires_grad_(True) for x in (q, t, n))
    loss, m = info_nce(ql, tl, temperature=0.1, negatives=nl, symmetric=True)
    loss.backward()
    torch.save({"loss": m["loss"], "gq": ql.grad, "gt": tl.grad, "gn": nl.grad}, os.path.join(out_dir, f"r{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_info_nce_cross_rank_gather_gives_full_batch_gradients():
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    q, t, n = (nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1) for _ in range(3))
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_ddp_worker, args=(2, os.path.join(d, "init"), q, t, n, d), nprocs=2, join=True)
        res = [torch.load(os.path.join(d, f"r{r}.pt")) for r in range(2)]
    qf, tf, nf = (x.clone().requires_grad_(True) for x in (q, t, n))
    full, mf = info_nce(qf, tf, temperature=0.1, negatives=nf, symmetric=True)
    full.backward()
    for r in range(2):
        assert res[r]["loss"] == pytest.approx(mf["loss"], rel=1e-5)
        sl = slice(r * 3, (r + 1) * 3)
        # DDP averages over 2 ranks: rank grad / world == full-batch grad of the local rows
        for key, ref in (("gq", qf.grad), ("gt", tf.grad), ("gn", nf.grad)):
            assert torch.allclose(res[r][key] / 2, ref[sl], atol=1e-6), (r, key)


def test_grad_cache_equals_full_batch_on_small_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.3), nn.Tanh(), nn.Linear(16, 4))
    net.train()  # dropout on: the RNG replay must reproduce it
    xq, xt = torch.randn(8, 6), torch.randn(8, 6)

    def enc(x):
        return nn.functional.normalize(net(x), dim=-1)

    def loss_fn(a, b):
        return info_nce(a, b, temperature=0.1)

    torch.manual_seed(123)
    loss_gc, _ = grad_cache_step(enc, [list(xq.split(3)), list(xt.split(3))], loss_fn)
    g_gc = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    # reference: the same chunks in the same RNG order, full graph
    torch.manual_seed(123)
    eq = torch.cat([enc(c) for c in xq.split(3)])
    et = torch.cat([enc(c) for c in xt.split(3)])
    loss_ref, _ = loss_fn(eq, et)
    loss_ref.backward()
    assert loss_gc.item() == pytest.approx(loss_ref.item(), rel=1e-6)
    for a, b in zip(g_gc, [p.grad for p in net.parameters()]):
        assert torch.allclose(a, b, atol=1e-6)


def test_image_decoder_selects_positions():
    class Layer(nn.Module):
        def forward(self, h, attention_mask=None, position_embeddings=None, position_ids=None):
            return h * 2

    dec = ImageDecoder(Layer(), hidden_size=4, out_dim=10)
    h = torch.randn(2, 5, 4)
    sel = torch.zeros(2, 5, dtype=torch.bool)
    sel[0, 1] = sel[1, 3] = True
    out = dec(h, (None, None), None, sel)
    assert out.shape == (2, 10)
    assert torch.allclose(out, dec.head(h[sel] * 2))
