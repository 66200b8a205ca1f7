"""Parameter-efficient fine-tuning through ``peft`` (LoRA / DoRA), merged into the base after each stage.

:func:`apply_adapters` injects adapters *in place* into the Hugging Face model held by
:class:`cocoa.model.wrapper.CocoaModel` (``get_peft_model`` replaces the target ``nn.Linear`` modules of
that very object), so the wrapper keeps calling its model as before; the returned ``PeftModel`` is only
used to merge (:func:`merge_adapters`, ``merge_and_unload``) before the stage's model is saved. Stage
outputs are therefore always plain, merged Qwen2-VL checkpoints that transformers loads directly.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from .config import LoraSection


def target_regex(cfg: LoraSection) -> str:
    """A peft ``target_modules`` regex: the listed leaf names, optionally excluding the vision tower."""
    names = "|".join(re.escape(n) for n in cfg.target_modules)
    if cfg.train_vision:
        return rf".*\.({names})$"
    return rf"^(?!.*visual).*\.({names})$"


def apply_adapters(hf_model: torch.nn.Module, cfg: LoraSection, *, extra_trainable: list[torch.nn.Module] = ()
                   ) -> Any | None:  # type: ignore[assignment]
    """Freeze the base, add LoRA/DoRA adapters (``cfg.method``) in place; ``None`` for full fine-tuning.

    ``extra_trainable`` modules (e.g. stage 1's image decoder) stay fully trainable either way.
    """
    if cfg.method == "full":
        for p in hf_model.parameters():
            p.requires_grad_(True)
        if not cfg.train_vision:
            visual = _visual(hf_model)
            if visual is not None:
                for p in visual.parameters():
                    p.requires_grad_(False)
        for m in extra_trainable:
            for p in m.parameters():
                p.requires_grad_(True)
        return None
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target_regex(cfg),
                      use_dora=cfg.method == "dora", bias="none")
    hint = "check the names (Qwen2-VL: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,qkv,fc1,fc2)"
    try:
        peft_model = get_peft_model(hf_model, lcfg)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        from .preflight import TrainError

        raise TrainError(f"--lora-target-modules {','.join(cfg.target_modules)}: {' '.join(str(e).split())[:300]}; "
                         f"{hint}") from None
    n = sum(1 for name, _ in hf_model.named_modules() if name.endswith("lora_A"))
    if n == 0:
        from .preflight import TrainError

        raise TrainError(
            f"no module of the model matches --lora-target-modules {','.join(cfg.target_modules)}; "
            "check the names (Qwen2-VL: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,qkv,fc1,fc2)"
        )
    for m in extra_trainable:
        for p in m.parameters():
            p.requires_grad_(True)
    if cfg.method == "dora":
        _direct_dora_weights(hf_model)
    return peft_model


def _direct_dora_weights(model: torch.nn.Module) -> None:
    """peft's DoRA forms ``B @ A`` as ``lora_B(lora_A(eye(in_features)))`` (an FSDP1 work-around) in every training
    forward of every adapted linear: for Qwen2-VL-2B's ``down_proj`` an 8960 x 8960 fp32 identity (321 MB) per layer
    per forward, more time than the projection itself on a CPU. Compute ``B @ A`` directly on plain tensors (the
    same product; peft detaches it for the weight norm); sharded (DTensor) weights keep peft's way."""
    import types

    def lora_weight(self: Any, lora_A: Any, lora_B: Any, adapter_name: Any = None) -> torch.Tensor:
        a, b = lora_A.weight, lora_B.weight
        if hasattr(a, "full_tensor") or hasattr(b, "full_tensor"):
            return type(self).get_lora_weight(self, lora_A, lora_B, adapter_name=adapter_name)
        return b @ a

    for m in model.modules():
        if type(m).__name__ == "DoraLinearLayer" and hasattr(m, "get_lora_weight"):
            m.get_lora_weight = types.MethodType(lora_weight, m)


def merge_adapters(peft_model: Any | None) -> None:
    """Fold the adapters into the base weights in place (no-op for full fine-tuning)."""
    if peft_model is None:
        return
    peft_model.merge_and_unload(progressbar=False, safe_merge=True)


def _visual(hf_model: torch.nn.Module) -> torch.nn.Module | None:
    for attr in ("visual",):
        for owner in (hf_model, getattr(hf_model, "model", None)):
            if owner is not None and hasattr(owner, attr):
                return getattr(owner, attr)
    return None


def count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    train = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return train, total


__all__ = ["apply_adapters", "merge_adapters", "target_regex", "count_parameters"]
