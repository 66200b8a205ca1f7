"""Attention masks for the three CoCoA stages.

Every mask is a boolean tensor ``[B, 1, L, L]`` where ``mask[b, 0, q, k]`` is True when query ``q`` may
attend to key ``k``. Masks are built from a per-sample :class:`Layout`: where the real tokens start and
end (so left and right padding both work), and where the EOS token that bridges block A and block B sits.

Segments of a sample (absolute positions in the padded row)::

    PAD ... PAD | A A A A (image + query text) | EOS | B B B (caption / answer) | PAD ...
                 start                          eos                             end

Rules shared by all masks:

* padding keys are never attended by real queries;
* a padding query attends only to itself (so no softmax row is empty -> no NaN); its output is ignored.

Patterns (True = may attend), for real tokens:

* ``causal``: ``k <= q``;
* ``bidirectional``: every real token;
* ``collaborative`` (stage 2), ``variant="paper"``: A -> A + EOS, EOS -> everything, B -> EOS + B;
  ``variant="strict"``: as paper but EOS -> A + EOS only. B never sees A: A's content reaches B
  only through the EOS position.

The same patterns exist as FlexAttention ``mask_mod`` functions (:func:`mask_mod`), and
:func:`block_mask` builds a ``BlockMask`` for CUDA. ``torch.nn.attention.flex_attention`` is imported
lazily. The dense functions here are written independently of the ``mask_mod`` functions (segment
tables vs index arithmetic) so that each checks the other in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

MaskKind = Literal["causal", "bidirectional", "collaborative", "collaborative_strict"]
Variant = Literal["paper", "strict"]

# segment ids used by the dense builders
PAD, SEG_A, SEG_EOS, SEG_B = 0, 1, 2, 3


@dataclass(frozen=True)
class Layout:
    """Per-sample positions inside a padded batch (all ``LongTensor [B]``, absolute indices).

    * ``start``: index of the first real token (``> 0`` only with left padding);
    * ``end``: one past the last real token;
    * ``eos``: index of the EOS token bridging A and B, or ``-1`` when the sample has no A/B split
      (stages 1 and 3: A = every real token).
    * ``length``: the padded sequence length ``L``.
    """

    start: torch.Tensor
    end: torch.Tensor
    eos: torch.Tensor
    length: int

    def __post_init__(self) -> None:
        for name in ("start", "end", "eos"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dim() != 1:
                raise ValueError(f"Layout.{name} must be a 1-D LongTensor (one entry per sample), got {t!r}")
        if not (len(self.start) == len(self.end) == len(self.eos)):
            raise ValueError("Layout.start, .end and .eos must have one entry per sample (same length)")
        if bool((self.start < 0).any()) or bool((self.end > self.length).any()) or bool((self.start >= self.end).any()):
            raise ValueError(
                f"Layout is inconsistent: need 0 <= start < end <= length={self.length} "
                f"(start={self.start.tolist()}, end={self.end.tolist()})"
            )
        has = self.eos >= 0
        if bool((has & ((self.eos < self.start) | (self.eos >= self.end))).any()):
            raise ValueError(f"Layout.eos must lie inside [start, end) or be -1 (eos={self.eos.tolist()})")

    @property
    def batch_size(self) -> int:
        return int(self.start.shape[0])

    @property
    def device(self) -> torch.device:
        return self.start.device

    def to(self, device: torch.device | str) -> "Layout":
        return Layout(self.start.to(device), self.end.to(device), self.eos.to(device), self.length)

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_lengths(
        cls,
        a_len: list[int] | torch.Tensor,
        b_len: list[int] | torch.Tensor | None = None,
        length: int | None = None,
        padding_side: Literal["left", "right"] = "right",
    ) -> "Layout":
        """Layouts from block lengths.

        With ``b_len`` given, each sample is ``A (a_len tokens) EOS B (b_len tokens)``; without it, each
        sample is ``a_len`` real tokens and has no EOS split (``eos = -1``). ``length`` defaults to the
        longest sample.
        """
        a = torch.as_tensor(a_len, dtype=torch.long)
        if b_len is None:
            n = a.clone()
            eos_rel = torch.full_like(a, -1)
        else:
            b = torch.as_tensor(b_len, dtype=torch.long)
            if b.shape != a.shape:
                raise ValueError("a_len and b_len need one entry per sample")
            n = a + 1 + b
            eos_rel = a
        if bool((n <= 0).any()):
            raise ValueError("every sample needs at least one real token")
        L = int(n.max()) if length is None else int(length)
        if bool((n > L).any()):
            raise ValueError(f"a sample has {int(n.max())} tokens, more than length={L}")
        start = (L - n) if padding_side == "left" else torch.zeros_like(n)
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        eos = torch.where(eos_rel >= 0, start + eos_rel, torch.full_like(n, -1))
        return cls(start=start, end=start + n, eos=eos, length=L)

    @classmethod
    def from_attention_mask(cls, attention_mask: torch.Tensor, eos: torch.Tensor | None = None) -> "Layout":
        """Layouts from a 2-D padding mask ``[B, L]`` (1 = real token; real tokens contiguous) and optional
        absolute EOS positions ``[B]`` (``-1`` = no split)."""
        m = attention_mask.bool()
        if m.dim() != 2:
            raise ValueError(f"attention_mask must be [B, L], got shape {tuple(m.shape)}")
        B, L = m.shape
        idx = torch.arange(L, device=m.device).expand(B, L)
        n = m.sum(1)
        if bool((n == 0).any()):
            raise ValueError("a row of attention_mask has no real token")
        start = torch.where(m, idx, torch.full_like(idx, L)).min(1).values
        end = torch.where(m, idx, torch.full_like(idx, -1)).max(1).values + 1
        if bool(((end - start) != n).any()):
            raise ValueError("attention_mask rows must have their real tokens contiguous (left or right padding)")
        e = torch.full((B,), -1, dtype=torch.long, device=m.device) if eos is None else eos.to(m.device).long()
        return cls(start=start, end=end, eos=e, length=L)

    def segments(self) -> torch.Tensor:
        """``LongTensor [B, L]`` with PAD=0, A=1, EOS=2, B=3 (no EOS split: every real token is A)."""
        B, L = self.batch_size, self.length
        idx = torch.arange(L, device=self.device).expand(B, L)
        real = (idx >= self.start[:, None]) & (idx < self.end[:, None])
        seg = torch.zeros((B, L), dtype=torch.long, device=self.device)
        has = (self.eos >= 0)[:, None]
        is_eos = has & (idx == self.eos[:, None])
        after = has & (idx > self.eos[:, None])
        seg[real] = SEG_A
        seg[real & after] = SEG_B
        seg[is_eos] = SEG_EOS
        return seg

    def padding_mask(self) -> torch.Tensor:
        """``BoolTensor [B, L]``: True at real tokens."""
        return self.segments() != PAD


# ---------------------------------------------------------------------------------------------
# dense masks
# ---------------------------------------------------------------------------------------------
def _finish(allowed: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Apply the padding rules to ``allowed [B, L, L]`` and add the head dim."""
    real = seg != PAD
    L = seg.shape[1]
    eye = torch.eye(L, dtype=torch.bool, device=seg.device)[None]
    allowed = allowed & real[:, None, :] & real[:, :, None]
    allowed = allowed | (eye & ~real[:, :, None])  # padded query -> itself only
    return allowed[:, None]


def causal_mask(layout: Layout) -> torch.Tensor:
    """Causal over real tokens: ``k <= q``. ``[B, 1, L, L]`` bool."""
    seg = layout.segments()
    L = layout.length
    tri = torch.ones((L, L), dtype=torch.bool, device=seg.device).tril()[None]
    return _finish(tri.expand(seg.shape[0], L, L), seg)


def bidirectional_mask(layout: Layout) -> torch.Tensor:
    """Every real token attends every real token. ``[B, 1, L, L]`` bool."""
    seg = layout.segments()
    B, L = seg.shape
    return _finish(torch.ones((B, L, L), dtype=torch.bool, device=seg.device), seg)


def _collab_table(variant: Variant, device: torch.device) -> torch.Tensor:
    # rows: query segment, cols: key segment, order PAD, A, EOS, B
    t = torch.zeros((4, 4), dtype=torch.bool, device=device)
    t[SEG_A, SEG_A] = t[SEG_A, SEG_EOS] = True
    t[SEG_EOS, SEG_A] = t[SEG_EOS, SEG_EOS] = True
    if variant == "paper":
        t[SEG_EOS, SEG_B] = True
    elif variant != "strict":
        raise ValueError(f"collaborative variant must be 'paper' or 'strict', got {variant!r}")
    t[SEG_B, SEG_EOS] = t[SEG_B, SEG_B] = True
    return t


def collaborative_mask(layout: Layout, variant: Variant = "paper") -> torch.Tensor:
    """Stage-2 mask. ``paper``: A->A+EOS, EOS->all, B->EOS+B; ``strict``: EOS->A+EOS. ``[B,1,L,L]`` bool.

    Samples without an EOS split (``eos = -1``) get the bidirectional mask (all their tokens are A).
    """
    seg = layout.segments()
    table = _collab_table(variant, seg.device)
    allowed = table[seg[:, :, None], seg[:, None, :]]
    return _finish(allowed, seg)


def build_mask(kind: MaskKind | str, layout: Layout) -> torch.Tensor:
    """Dispatch by name: ``causal``, ``bidirectional``, ``collaborative`` (paper), ``collaborative_strict``."""
    if kind == "causal":
        return causal_mask(layout)
    if kind == "bidirectional":
        return bidirectional_mask(layout)
    if kind in ("collaborative", "collaborative_paper"):
        return collaborative_mask(layout, "paper")
    if kind == "collaborative_strict":
        return collaborative_mask(layout, "strict")
    raise ValueError(
        f"unknown attention mask {kind!r}; use causal, bidirectional, collaborative or collaborative_strict"
    )


def to_additive(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bool mask -> additive float mask (0 where allowed, the dtype's minimum elsewhere), for ``eager``."""
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device)
    return torch.where(mask, zero, neg)


# ---------------------------------------------------------------------------------------------
# FlexAttention
# ---------------------------------------------------------------------------------------------
def mask_mod(kind: MaskKind | str, layout: Layout) -> Callable:
    """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool`` for ``kind`` over ``layout``.

    Written with index arithmetic only (no data-dependent Python control flow), so it works under
    ``torch.vmap`` (``create_mask``), ``create_block_mask`` and plain broadcasting.
    """
    start, end, eos = layout.start, layout.end, layout.eos

    def real(b, i):
        return (i >= start[b]) & (i < end[b])

    def pad_rule(b, q, k, allowed):
        rq, rk = real(b, q), real(b, k)
        return (allowed & rq & rk) | (~rq & (q == k))

    if kind == "causal":

        def mod(b, h, q, k):
            return pad_rule(b, q, k, k <= q)

    elif kind == "bidirectional":

        def mod(b, h, q, k):
            return pad_rule(b, q, k, q == q)

    elif kind in ("collaborative", "collaborative_paper", "collaborative_strict"):
        strict = kind == "collaborative_strict"

        def mod(b, h, q, k):
            e = eos[b]
            no_split = e < 0
            q_a, k_a = q < e, k < e
            q_e, k_e = q == e, k == e
            q_b, k_b = q > e, k > e
            eos_row = (k <= e) if strict else (k == k)
            allowed = (q_a & (k_a | k_e)) | (q_e & eos_row) | (q_b & (k_e | k_b))
            return pad_rule(b, q, k, allowed | no_split)

    else:
        raise ValueError(
            f"unknown attention mask {kind!r}; use causal, bidirectional, collaborative or collaborative_strict"
        )
    return mod


def render_mask_mod(mod: Callable, batch_size: int, length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Evaluate a ``mask_mod`` densely with FlexAttention's own ``create_mask`` (vmap) -> ``[B,1,L,L]``."""
    from torch.nn.attention.flex_attention import create_mask

    return create_mask(mod, batch_size, 1, length, length, device=device).bool()


def block_mask(kind: MaskKind | str, layout: Layout, block_size: int = 128, compile: bool = False):
    """A FlexAttention ``BlockMask`` (``[B, 1, L, L]``) for ``kind`` over ``layout`` (CUDA or CPU)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(
        mask_mod(kind, layout),
        layout.batch_size,
        None,
        layout.length,
        layout.length,
        device=layout.device,
        BLOCK_SIZE=block_size,
        _compile=compile,
    )
