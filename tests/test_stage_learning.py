"""Each CoCoA stage lowers its loss on scenes data with the tiny model (small fixed budget, clear margin).

This drives the method's own objectives (not the training app): stage 1 MNTP + MAE under the bidirectional
mask, stage 2 EOS reconstruction under the collaborative mask, stage 3 InfoNCE (through GradCache).
"""

import itertools

import pytest
import torch

from cocoa.sources.scenes import iter_train_pairs
from cocoa.records import MixRecord
from cocoa.model.collate import EmbedCollator, Stage1Collator, Stage2Collator
from cocoa.model.wrapper import CocoaModel

STEPS = 30  # small fixed budget (the suite runs on 2 shared cores); a clear margin is still required
BATCH = 4
IMAGE = 56  # 4 LLM image tokens per image


@pytest.fixture(scope="module")
def data():
    pairs = [p for p in iter_train_pairs(64, seed=0, image_size=IMAGE) if p.qry_image is not None and p.pos_text and p.pos_image is None]
    pairs = pairs[:BATCH * 2]
    assert len(pairs) == BATCH * 2
    mix = [MixRecord(origin="original", origin_id=p.id, source=p.source, stages=[1, 2], image=p.qry_image,
                     prompt=p.qry_text, text=p.pos_text) for p in pairs]
    return pairs, mix


def train(model, batches, loss_fn, steps=STEPS, lr=1e-3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for _, batch in zip(range(steps), itertools.cycle(batches)):
        opt.zero_grad(set_to_none=True)
        loss, metrics = loss_fn(batch)
        if loss.requires_grad:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(metrics["loss"])
    return losses


def drop(losses, k=8):
    first = sum(losses[:k]) / k
    last = sum(losses[-k:]) / k
    return first, last


def fresh(tiny_model_dir):
    """The tiny model cut to 2 LLM layers (>= 2 so stage 2's EOS bridge exists) and 1 vision block, to fit
    the suite's CPU budget."""
    torch.manual_seed(0)
    m = CocoaModel.from_pretrained(tiny_model_dir)
    lm = m.inner.language_model
    lm.layers = lm.layers[:2]
    m.hf_config.text_config.num_hidden_layers = 2
    m.inner.visual.blocks = m.inner.visual.blocks[:1]
    m.train()
    return m


def test_stage1_loss_drops(tiny_model_dir, data):
    _, mix = data
    m = fresh(tiny_model_dir)
    m.ensure_image_decoder()
    coll = Stage1Collator(m.processor, m.spec, seed=0)
    # several maskings of the same records, cycled
    batches = [coll(mix[i : i + BATCH]) for i in (0, BATCH, 0, BATCH)]
    losses = train(m, batches, lambda b: m.stage1_loss(b, mae_weight=0.5))
    first, last = drop(losses)
    print("loss first/last", first, last)
    assert last < 0.6 * first, (first, last)


def test_stage2_loss_drops(tiny_model_dir, data):
    _, mix = data
    m = fresh(tiny_model_dir)
    coll = Stage2Collator(m.processor, m.spec, seed=0)
    batches = [coll(mix[i : i + BATCH]) for i in (0, BATCH, 0, BATCH)]
    losses = train(m, batches, m.stage2_loss)
    first, last = drop(losses)
    print("loss first/last", first, last)
    assert last < 0.6 * first, (first, last)


def test_stage3_loss_drops_with_grad_cache(tiny_model_dir, data):
    pairs, _ = data
    m = fresh(tiny_model_dir)
    coll = EmbedCollator(m.processor, m.spec)
    batches = []
    for i in (0, BATCH):
        chunk = pairs[i : i + BATCH]
        qc = [coll([(p.qry_text, p.qry_image) for p in chunk[j : j + BATCH // 2]]) for j in (0, BATCH // 2)]
        tc = [coll([(p.pos_text, None) for p in chunk[j : j + BATCH // 2]]) for j in (0, BATCH // 2)]
        batches.append((qc, tc))
    losses = train(m, batches, lambda b: m.stage3_grad_cache_step(b[0], b[1], temperature=0.05), steps=20)
    first, last = drop(losses)
    print("loss first/last", first, last)
    assert last < 0.5 * first, (first, last)
