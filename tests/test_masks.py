"""Attention masks: exact matrices on hand-written layouts; flex mask_mods == dense masks on random layouts."""

import pytest
import torch

from cocoa.model.masks import (
    Layout,
    bidirectional_mask,
    block_mask,
    build_mask,
    causal_mask,
    collaborative_mask,
    mask_mod,
    render_mask_mod,
    to_additive,
)

KINDS = ["causal", "bidirectional", "collaborative", "collaborative_strict"]


def M(rows):
    return torch.tensor(rows, dtype=torch.bool)


# One sample, right padding: A A EOS B B PAD (L=6)
RIGHT = Layout.from_lengths([2], [2], length=6, padding_side="right")
# One sample, left padding: PAD A EOS B (L=4)
LEFT = Layout.from_lengths([1], [1], length=4, padding_side="left")


def test_layout_positions():
    assert RIGHT.start.tolist() == [0] and RIGHT.end.tolist() == [5] and RIGHT.eos.tolist() == [2]
    assert LEFT.start.tolist() == [1] and LEFT.end.tolist() == [4] and LEFT.eos.tolist() == [2]
    assert RIGHT.segments().tolist() == [[1, 1, 2, 3, 3, 0]]
    lay = Layout.from_attention_mask(torch.tensor([[0, 0, 1, 1, 1]]), torch.tensor([3]))
    assert lay.start.tolist() == [2] and lay.end.tolist() == [5] and lay.eos.tolist() == [3]


def test_collaborative_paper_exact():
    expected = M([
        # A  A  E  B  B  P
        [1, 1, 1, 0, 0, 0],  # A
        [1, 1, 1, 0, 0, 0],  # A
        [1, 1, 1, 1, 1, 0],  # EOS sees everything
        [0, 0, 1, 1, 1, 0],  # B: EOS + B, never A
        [0, 0, 1, 1, 1, 0],  # B
        [0, 0, 0, 0, 0, 1],  # padded query: itself only
    ])
    assert torch.equal(collaborative_mask(RIGHT, "paper")[0, 0], expected)


def test_collaborative_strict_exact():
    expected = M([
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],  # EOS sees A + itself only
        [0, 0, 1, 1, 1, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ])
    assert torch.equal(collaborative_mask(RIGHT, "strict")[0, 0], expected)


def test_causal_and_bidirectional_exact_left_padding():
    causal = M([
        [1, 0, 0, 0],  # pad
        [0, 1, 0, 0],
        [0, 1, 1, 0],
        [0, 1, 1, 1],
    ])
    bidir = M([
        [1, 0, 0, 0],
        [0, 1, 1, 1],
        [0, 1, 1, 1],
        [0, 1, 1, 1],
    ])
    collab = M([
        [1, 0, 0, 0],
        [0, 1, 1, 0],  # A: A + EOS
        [0, 1, 1, 1],  # EOS: all
        [0, 0, 1, 1],  # B: EOS + B
    ])
    assert torch.equal(causal_mask(LEFT)[0, 0], causal)
    assert torch.equal(bidirectional_mask(LEFT)[0, 0], bidir)
    assert torch.equal(collaborative_mask(LEFT)[0, 0], collab)


def test_no_split_sample_is_bidirectional_under_collaborative():
    lay = Layout.from_lengths([3], None, length=4)
    assert torch.equal(collaborative_mask(lay), bidirectional_mask(lay))


def test_every_row_has_a_key_and_padding_keys_unused():
    lay = Layout.from_lengths([3, 1, 5], [2, 4, 0], length=10, padding_side="left")
    real = lay.padding_mask()
    for kind in KINDS:
        m = build_mask(kind, lay)[:, 0]
        assert m.shape == (3, 10, 10) and m.dtype == torch.bool
        assert bool(m.any(-1).all()), kind  # no empty softmax row
        # real queries never see padding keys
        assert not bool((m & real[:, :, None] & ~real[:, None, :]).any()), kind


def test_additive_mask():
    add = to_additive(collaborative_mask(RIGHT), torch.float32)
    assert add[0, 0, 3, 0] == torch.finfo(torch.float32).min and add[0, 0, 3, 2] == 0


def test_bad_layouts_raise():
    with pytest.raises(ValueError):
        Layout.from_lengths([5], [2], length=4)
    with pytest.raises(ValueError):
        Layout.from_attention_mask(torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError):
        build_mask("sideways", RIGHT)


@pytest.mark.parametrize("side", ["left", "right"])
def test_mask_mod_rendered_equals_dense_random(side):
    g = torch.Generator().manual_seed(0)
    for trial in range(6):
        B = int(torch.randint(1, 5, (1,), generator=g))
        a = torch.randint(1, 9, (B,), generator=g)
        b = torch.randint(0, 7, (B,), generator=g)
        split = torch.rand(B, generator=g) < 0.8
        L = int((a + 1 + b).max()) + int(torch.randint(0, 4, (1,), generator=g))
        lay = Layout.from_lengths(a, b, length=L, padding_side=side)
        # some samples without an EOS split (stage 1/3 style)
        lay = Layout(lay.start, lay.end, torch.where(split, lay.eos, torch.full_like(lay.eos, -1)), lay.length)
        for kind in KINDS:
            dense = build_mask(kind, lay)
            rendered = render_mask_mod(mask_mod(kind, lay), B, L)
            assert torch.equal(dense, rendered), (trial, kind, side)


def test_block_mask_matches_dense():
    lay = Layout.from_lengths([5, 2], [3, 6], length=12, padding_side="right")
    bm = block_mask("collaborative", lay, block_size=4)
    dense = collaborative_mask(lay)
    assert tuple(bm.shape) == (2, 1, 12, 12)
    # the BlockMask's own mask_mod renders to the dense mask
    assert torch.equal(render_mask_mod(bm.mask_mod, 2, 12), dense)
