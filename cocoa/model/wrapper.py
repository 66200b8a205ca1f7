"""``CocoaModel``: a Hugging Face Qwen2-VL / Qwen2.5-VL run with CoCoA's attention masks.

No modeling file is forked. The wrapper

1. computes M-RoPE ``position_ids`` itself with ``model.model.get_rope_index`` from the 2-D padding mask
   (keyword arguments filtered by signature: transformers 5.24 wants ``mm_token_type_ids``, 5.17 does not),
2. builds the stage's 4-D mask (:mod:`cocoa.model.masks`) in the form the attention implementation takes
   (``sdpa``: bool, True = attend; ``eager``: additive float; ``cocoa_flex``: a FlexAttention ``BlockMask``),
3. runs the inner ``Qwen2VLModel`` with ``position_ids`` + the 4-D mask (a 4-D mask is used as-is by
   transformers' mask preparation) and returns the last hidden states.

Batches are the dicts produced by :mod:`cocoa.model.collate`.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import torch.nn as nn

from ..records import RecordError
from . import masks as M
from .objectives import (
    ImageDecoder,
    eos_reconstruction_loss,
    grad_cache_step,
    info_nce,
    mae_loss,
    mntp_loss,
    shifted_positions,
)
from .spec import SPEC_FILE, EmbeddingSpec
from ..errors import CocoaError

log = logging.getLogger(__name__)

DECODER_FILE = "cocoa_image_decoder.safetensors"
MODEL_TYPES = {"qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2.5-vl"}


def _model_class(model_type: str):  # type: ignore[no-untyped-def]
    if model_type == "qwen2_vl":
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration
    if model_type == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration
    raise RecordError(f"model type {model_type!r} is not supported by cocoa; use a Qwen2-VL or Qwen2.5-VL checkpoint")


def call_filtered(fn: Any, **kwargs: Any) -> Any:
    """Call ``fn`` with only the keyword arguments its signature names (version-proof HF calls).

    A ``**kwargs`` catch-all does not count: transformers 5.17's forward would otherwise receive
    ``mm_token_type_ids`` (a 5.24 argument) and push it down to the attention layers."""
    params = inspect.signature(fn).parameters
    named = {k for k, p in params.items() if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    return fn(**{k: v for k, v in kwargs.items() if k in named})


def ensure_mask_token(tokenizer: Any, model: Any, mask_token: str = "<|mask|>") -> int:
    """Add ``mask_token`` as a special token if the tokenizer lacks it; resize embeddings only when its
    id falls outside the (padded) embedding matrix. Returns the id."""
    vocab = tokenizer.get_vocab()
    if mask_token not in vocab:
        from transformers import AddedToken

        # add_tokens(special_tokens=True) appends without replacing the existing additional special tokens
        tokenizer.add_tokens([AddedToken(mask_token, special=True, normalized=False)], special_tokens=True)
    tid = int(tokenizer.convert_tokens_to_ids(mask_token))
    n_rows = model.get_input_embeddings().weight.shape[0]
    if tid >= n_rows:
        log.warning("resizing token embeddings from %d to %d rows for %s", n_rows, tid + 1, mask_token)
        model.resize_token_embeddings(tid + 1)
    return tid


class VocabMismatchError(CocoaError):
    """The tokenizer can produce token ids the model's embedding table does not have."""


def vocab_mismatch(n_tokens: int, top_id: int, n_rows: int, where: str) -> str | None:
    """The message when a tokenizer of ``n_tokens`` tokens (highest id ``top_id``) does not fit an embedding
    table of ``n_rows`` rows, else ``None``."""
    need = max(n_tokens, top_id + 1)
    if need <= n_rows:
        return None
    return (f"{where}: the tokenizer has {n_tokens} tokens (ids up to {top_id}) but the model's token embedding "
            f"table has {n_rows} rows, so ids {n_rows}..{need - 1} have no embedding (the tokenizer was changed, "
            "e.g. tokens were added, without resizing the model). Use the tokenizer saved with the model, or resize "
            "the model (model.resize_token_embeddings(len(tokenizer))) and save both together")


def check_vocab_fits(tokenizer: Any, model: Any, where: str) -> None:
    """Refuse a tokenizer whose ids do not all index the model's input embeddings (a raw torch IndexError
    in the middle of training or evaluation otherwise)."""
    vocab = tokenizer.get_vocab()
    top = max(vocab.values()) if vocab else -1
    msg = vocab_mismatch(len(tokenizer), top, int(model.get_input_embeddings().weight.shape[0]), where)
    if msg:
        raise VocabMismatchError(msg)


def _load_weights(model_cls: Any, path: str, hf_kwargs: dict[str, Any]) -> nn.Module:
    """``model_cls.from_pretrained``; a missing, truncated or mismatched weights file is one
    :class:`RecordError` naming the model directory (never a safetensors/OSError/size-mismatch traceback)."""
    import torch

    try:
        return model_cls.from_pretrained(path, **hf_kwargs)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:
        if isinstance(e, RecordError):
            raise
        text = " ".join(str(e).split())
        name = type(e).__name__
        if "size mismatch" in text or "ignore_mismatched_sizes" in text:
            why = "its config.json does not match its weights (tensors of another size)"
        elif isinstance(e, OSError) and ("no file named" in text.lower() or "does not appear to have" in text):
            why = "it has no weights file (model.safetensors)"
        elif name == "SafetensorError" or "safetensors" in text.lower() or "header" in text.lower():
            why = "its weights file is damaged or truncated"
        elif isinstance(e, (OSError, RuntimeError, ValueError, KeyError, EOFError)) or name == "SafetensorError":
            why = "its weights cannot be loaded"
        else:
            raise
        raise RecordError(f"model directory {path}: {why} ({name}: {text[:200]}); re-download or rebuild the "
                          "model") from None


class CocoaModel(nn.Module):
    """A Qwen2-VL/Qwen2.5-VL conditional-generation model + its processor + :class:`EmbeddingSpec`.

    ``self.model`` is the HF model (it may be wrapped by PEFT afterwards: the wrapper unwraps with
    ``get_base_model()``). ``self.image_decoder`` (stage-1 MAE) is created on first use by
    :meth:`ensure_image_decoder`.
    """

    def __init__(self, model: nn.Module, processor: Any, spec: EmbeddingSpec) -> None:
        super().__init__()
        self.model = model
        self.processor = processor
        self.spec = spec
        self.image_decoder: ImageDecoder | None = None
        tok = processor.tokenizer
        self.image_token_id = int(self.hf_config.image_token_id)
        if spec.eos_token_id is None:
            spec.eos_token_id = int(tok.convert_tokens_to_ids(spec.eos_token))
        if spec.mask_token_id is None:
            spec.mask_token_id = int(tok.convert_tokens_to_ids(spec.mask_token))

    # -- loading / saving -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        spec: EmbeddingSpec | None = None,
        attn_implementation: str | None = "sdpa",
        load_image_decoder: bool = True,
        **hf_kwargs: Any,
    ) -> "CocoaModel":
        """Load model + processor from ``path`` (a local HF directory or hub id).

        ``spec`` defaults to ``path/cocoa.json`` if present, else a fresh spec for the architecture.
        ``attn_implementation``: ``sdpa`` (default), ``eager``, or ``cocoa_flex`` (FlexAttention via
        :mod:`cocoa.model.flex`). Other keyword arguments go to HF ``from_pretrained`` (e.g. ``dtype``).
        """
        from transformers import AutoConfig, AutoProcessor

        path = str(path)
        try:
            config = AutoConfig.from_pretrained(path)
        except Exception as e:
            raise RecordError(f"cannot load a model config from {path} ({e}); pass a Qwen2-VL/Qwen2.5-VL model dir") from None
        model_cls = _model_class(config.model_type)
        if attn_implementation == "cocoa_flex":
            from .flex import register_flex_attention

            register_flex_attention()
        if attn_implementation is not None:
            hf_kwargs["attn_implementation"] = attn_implementation
        model = _load_weights(model_cls, path, hf_kwargs)
        processor = AutoProcessor.from_pretrained(path)
        if spec is None:
            if (Path(path) / SPEC_FILE).is_file():
                spec = EmbeddingSpec.load(path)
            else:
                spec = EmbeddingSpec(arch=MODEL_TYPES[config.model_type], base_model=path)  # type: ignore[arg-type]
        spec = spec.model_copy(deep=True)
        spec.mask_token_id = ensure_mask_token(processor.tokenizer, model, spec.mask_token)
        check_vocab_fits(processor.tokenizer, model, str(path))  # train and eval (Embedder) both load here
        eos_id = processor.tokenizer.convert_tokens_to_ids(spec.eos_token)
        if eos_id is None or eos_id == processor.tokenizer.unk_token_id:
            raise RecordError(f"EOS token {spec.eos_token!r} (cocoa.json) is not in the tokenizer of {path}")
        if spec.eos_token_id is not None and spec.eos_token_id != eos_id:
            raise RecordError(f"{path}: cocoa.json says EOS {spec.eos_token!r} has id {spec.eos_token_id}, tokenizer says {eos_id}")
        spec.eos_token_id = int(eos_id)
        self = cls(model, processor, spec)
        dec = Path(path) / DECODER_FILE
        if load_image_decoder and dec.is_file():
            from safetensors.torch import load_file

            self.ensure_image_decoder().load_state_dict(load_file(str(dec)))
            self.image_decoder.to(device=self.device, dtype=self.dtype)  # type: ignore[union-attr]
        return self

    def save_pretrained(self, out_dir: str | Path, stages: Sequence[int] | None = None, save_image_decoder: bool = False) -> Path:
        """Write HF weights + processor + ``cocoa.json`` (``stages`` recorded); the MAE image decoder only
        with ``save_image_decoder`` (it is not needed for embedding)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        self.processor.save_pretrained(out)
        spec = self.spec.model_copy(deep=True)
        if stages is not None:
            spec.stages = sorted(set(spec.stages) | {int(s) for s in stages})
        spec.save(out)
        if save_image_decoder and self.image_decoder is not None:
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous().cpu() for k, v in self.image_decoder.state_dict().items()}, str(out / DECODER_FILE))
        return out

    # -- accessors ----------------------------------------------------------------------------------
    @property
    def base(self) -> nn.Module:
        """The HF ``*ForConditionalGeneration`` (unwrapped from PEFT if needed)."""
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    @property
    def hf_config(self) -> Any:
        return self.base.config

    @property
    def inner(self) -> nn.Module:
        """The HF ``Qwen2VLModel`` (vision tower + language model)."""
        return self.base.model

    @property
    def lm_head(self) -> nn.Module:
        return self.base.lm_head

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.base.parameters()).dtype

    @property
    def attn_implementation(self) -> str:
        cfg = self.hf_config
        text = getattr(cfg, "text_config", cfg)
        return getattr(text, "_attn_implementation", None) or getattr(cfg, "_attn_implementation", "sdpa")

    def set_attention(self, impl: str) -> None:
        """Switch the LLM's attention implementation (``sdpa``, ``eager`` or ``cocoa_flex``); the vision
        tower keeps its own. Masks are built for the new implementation from the next forward on."""
        if impl not in ("sdpa", "eager", "cocoa_flex"):
            raise RecordError(f"attention implementation {impl!r} is not supported; use sdpa, eager or cocoa_flex")
        if impl == "cocoa_flex":
            from .flex import register_flex_attention

            register_flex_attention()
        self.hf_config.text_config._attn_implementation = impl

    # -- masks and positions -----------------------------------------------------------------------
    @staticmethod
    def layout(batch: dict[str, torch.Tensor]) -> M.Layout:
        return M.Layout.from_attention_mask(batch["attention_mask"], batch.get("eos_pos"))

    def attention_mask_4d(self, kind: str, layout: M.Layout) -> Any:
        """The stage mask in the form this model's attention implementation takes."""
        impl = self.attn_implementation
        if impl == "cocoa_flex":
            return M.block_mask(kind, layout)
        mask = M.build_mask(kind, layout)
        if impl == "sdpa":
            return mask
        if impl == "eager":
            return M.to_additive(mask, self.dtype)
        raise RecordError(
            f"attention implementation {impl!r} cannot take a custom 4-D mask; load with attn_implementation="
            "'sdpa', 'eager' or 'cocoa_flex'"
        )

    def position_ids(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """M-RoPE positions ``[3, B, L]`` from the 2-D padding mask (padding gets position 0... as HF)."""
        ids = batch["input_ids"]
        mm = batch.get("mm_token_type_ids")
        if mm is None:
            mm = (ids == self.image_token_id).long()
        pos, _ = call_filtered(
            self.inner.get_rope_index,
            input_ids=ids,
            mm_token_type_ids=mm,
            image_grid_thw=batch.get("image_grid_thw"),
            video_grid_thw=None,
            attention_mask=batch["attention_mask"],
        )
        return pos

    # -- forward ---------------------------------------------------------------------------------------
    def run(self, batch: dict[str, torch.Tensor], mask: str | Any = "bidirectional") -> tuple[torch.Tensor, Any, torch.Tensor]:
        """Forward; returns ``(last_hidden [B, L, D], the 4-D mask used, position_ids [3, B, L])``.

        ``mask``: a kind name (``causal``, ``bidirectional``, ``collaborative``, ``collaborative_strict``) or a
        ready 4-D mask / BlockMask.
        """
        mask4 = self.attention_mask_4d(mask, self.layout(batch)) if isinstance(mask, str) else mask
        pos = self.position_ids(batch)
        kwargs: dict[str, Any] = dict(
            input_ids=batch["input_ids"], attention_mask=mask4, position_ids=pos, use_cache=False,
        )
        if batch.get("pixel_values") is not None:
            kwargs.update(
                pixel_values=batch["pixel_values"].to(self.dtype),
                image_grid_thw=batch["image_grid_thw"],
                mm_token_type_ids=batch.get("mm_token_type_ids"),
            )
        out = call_filtered(self.inner.forward, **kwargs)
        return out.last_hidden_state, mask4, pos

    def forward_hidden(self, batch: dict[str, torch.Tensor], attn_mask_4d: str | Any = "bidirectional") -> torch.Tensor:
        """Last hidden states ``[B, L, D]`` under ``attn_mask_4d`` (a kind name or a ready mask)."""
        return self.run(batch, attn_mask_4d)[0]

    def forward(self, batch: dict[str, torch.Tensor], attn_mask_4d: str | Any = "bidirectional") -> torch.Tensor:
        return self.forward_hidden(batch, attn_mask_4d)

    def pool(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pool per spec (``eos``: hidden state at ``eos_pos``; ``last``: last real token; ``mean``)."""
        B = hidden.shape[0]
        ar = torch.arange(B, device=hidden.device)
        if self.spec.pooling == "mean":
            m = batch["attention_mask"].to(hidden.dtype)[..., None]
            emb = (hidden * m).sum(1) / m.sum(1).clamp_min(1)
        elif self.spec.pooling == "eos":
            eos = batch.get("eos_pos")
            if eos is None or bool((eos < 0).any()):
                raise RecordError("EOS pooling needs eos_pos for every sample; build batches with EmbedCollator")
            emb = hidden[ar, eos.to(hidden.device)]
        else:
            end = self.layout(batch).end - 1
            emb = hidden[ar, end.to(hidden.device)]
        if self.spec.normalize:
            emb = nn.functional.normalize(emb.float(), dim=-1).to(hidden.dtype)
        return emb

    def embed(self, batch: dict[str, torch.Tensor], mask: str | None = None) -> torch.Tensor:
        """Embeddings ``[B, D]`` (pooled per spec, L2-normalised when ``spec.normalize``) under ``mask``
        (default: ``spec.attention``)."""
        hidden = self.forward_hidden(batch, mask or self.spec.attention)
        return self.pool(hidden, batch)

    # -- objectives --------------------------------------------------------------------------------------
    def ensure_image_decoder(self, layer_index: int | None = None) -> ImageDecoder:
        """Create (once) the MAE decoder from a middle LLM layer (default ``n_layers // 2``)."""
        if self.image_decoder is None:
            layers = self.inner.language_model.layers
            idx = len(layers) // 2 if layer_index is None else layer_index
            hidden = self.hf_config.text_config.hidden_size
            merge = self.hf_config.vision_config.spatial_merge_size
            vc = self.hf_config.vision_config
            patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
            self.image_decoder = ImageDecoder(layers[idx], hidden, out_dim=merge**2 * patch_dim).to(
                device=self.device, dtype=self.dtype
            )
            # a full, trainable copy even when the LLM is frozen or LoRA-wrapped (call before PEFT wrapping
            # to copy the plain layer)
            self.image_decoder.requires_grad_(True)
        return self.image_decoder

    def stage1_loss(
        self, batch: dict[str, torch.Tensor], mae_weight: float = 0.5, norm_pix: bool = False
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Stage 1 under the bidirectional mask: MNTP on masked text + ``mae_weight`` * MAE on masked
        image units (decoder reads the LLM's hidden states at the masked image tokens)."""
        hidden, mask4, pos = self.run(batch, "bidirectional")
        mntp = mntp_loss(hidden, batch["labels"], self.lm_head)
        metrics: dict[str, float] = {"mntp": float(mntp.detach()), "n_masked_text": float((batch["labels"] != -100).sum())}
        loss = mntp
        unit_mask = batch.get("image_unit_mask")
        if unit_mask is not None and mae_weight > 0:
            image_tok = (batch["input_ids"] == self.image_token_id) & batch["attention_mask"].bool()
            if int(image_tok.sum()) != unit_mask.numel():
                raise RecordError(
                    f"{int(image_tok.sum())} image tokens but {unit_mask.numel()} MAE units; the batch was not "
                    "built by Stage1Collator with this model's processor"
                )
            select = torch.zeros_like(image_tok)
            select[image_tok] = unit_mask.to(image_tok.device)
            decoder = self.ensure_image_decoder()
            lm = self.inner.language_model
            pos_emb = lm.rotary_emb(hidden, pos)
            pred = decoder(hidden, pos_emb, mask4, select, position_ids=None)
            mae = mae_loss(pred, batch["pixel_values_clean"].to(pred.device), unit_mask.to(pred.device),
                           self.hf_config.vision_config.spatial_merge_size, norm_pix)
            loss = loss + mae_weight * mae
            metrics.update(mae=float(mae.detach()), n_masked_units=float(unit_mask.sum()))
        metrics["loss"] = float(loss.detach())
        return loss, metrics

    def stage2_loss(
        self, batch: dict[str, torch.Tensor], variant: Literal["paper", "strict"] = "paper"
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Stage 2 under the collaborative mask: masked B tokens predicted from the previous position
        (the first B token from EOS); A reaches B only through EOS."""
        kind = "collaborative" if variant == "paper" else "collaborative_strict"
        hidden = self.forward_hidden(batch, kind)
        labels = batch["labels"]
        loss = eos_reconstruction_loss(hidden, labels, self.lm_head, batch["eos_pos"])
        with torch.no_grad():
            b, src, tgt = shifted_positions(labels)
            acc = (self.lm_head(hidden[b, src]).argmax(-1) == tgt).float().mean() if tgt.numel() else torch.tensor(0.0)
        return loss, {"loss": float(loss.detach()), "acc": float(acc), "n_masked": float(tgt.numel())}

    def stage3_loss(
        self,
        query: dict[str, torch.Tensor],
        target: dict[str, torch.Tensor],
        negative: dict[str, torch.Tensor] | None = None,
        temperature: float = 0.02,
        symmetric: bool = False,
        gather: bool = True,
        mask: str | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """InfoNCE on EOS embeddings of query/target batches (optional hard-negative batch)."""
        q = self.embed(query, mask)
        t = self.embed(target, mask)
        n = self.embed(negative, mask) if negative is not None else None
        return info_nce(q, t, temperature, n, symmetric, gather)

    def stage3_grad_cache_step(
        self,
        query_chunks: Sequence[dict[str, torch.Tensor]],
        target_chunks: Sequence[dict[str, torch.Tensor]],
        negative_chunks: Sequence[dict[str, torch.Tensor]] | None = None,
        temperature: float = 0.02,
        symmetric: bool = False,
        gather: bool = True,
        mask: str | None = None,
        scale: float = 1.0,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """GradCache stage-3 step over chunked batches; accumulates parameter grads equal to the full-batch
        InfoNCE gradients (times ``scale``). Does not step the optimizer."""
        groups = [list(query_chunks), list(target_chunks)]
        if negative_chunks:
            groups.append(list(negative_chunks))

        def loss_fn(q: torch.Tensor, t: torch.Tensor, n: torch.Tensor | None = None):  # type: ignore[no-untyped-def]
            return info_nce(q, t, temperature, n, symmetric, gather)

        return grad_cache_step(lambda b: self.embed(b, mask), groups, loss_fn, scale)


__all__ = ["CocoaModel", "DECODER_FILE", "call_filtered", "ensure_mask_token", "check_vocab_fits", "vocab_mismatch",
           "VocabMismatchError"]
