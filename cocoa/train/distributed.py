"""Process-group plumbing: the same command runs alone, under ``torchrun`` or ``accelerate launch``.

Both launchers set ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``;
:func:`init` reads them and starts NCCL on CUDA or gloo on CPU. Wrapping:

* adapters (LoRA/DoRA) and small models -> ``DistributedDataParallel`` (gradients all-reduced);
* full fine-tuning of a large backbone on CUDA (``--strategy fsdp`` or ``auto``) -> FSDP2
  (``torch.distributed.fsdp.fully_shard`` per decoder / vision block, then the root).

Contrastive negatives are gathered across ranks by :func:`cocoa.model.objectives.gather_with_grad` (all
ranks' embeddings, the local slice keeping its autograd graph), so the stage-3 loss is the global-batch
loss on every rank.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = ""

    @property
    def enabled(self) -> bool:
        """A process group is running: several processes, or one launched by torchrun (so that
        ``torchrun --nproc_per_node 1 ... --strategy fsdp`` really wraps with FSDP2 on one GPU)."""
        return self.world > 1 or bool(self.backend)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str | None = None) -> DistInfo:
    """Start the process group when launched by torchrun/accelerate; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    backend = ""
    # torchrun sets TORCHELASTIC_RUN_ID; a single torchrun process starts a one-rank group too (DDP / FSDP2 then
    # run exactly as on many GPUs), a plain `python -m cocoa.cli.train` does not
    if world > 1 or (world == 1 and "TORCHELASTIC_RUN_ID" in os.environ and "MASTER_ADDR" in os.environ):
        backend = "nccl" if use_cuda else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, timeout=timedelta(minutes=30),
                                    **({"device_id": dev} if use_cuda else {}))
    return DistInfo(rank=rank, world=world, local_rank=local, device=dev, backend=backend)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any, info: DistInfo) -> list[Any]:
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(value: float | int, info: DistInfo) -> float:
    if not info.enabled:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64,
                     device=info.device if info.backend == "nccl" else "cpu")
    dist.all_reduce(t)
    return float(t.item())


def wrap_model(module: torch.nn.Module, info: DistInfo, strategy: str, full_finetune: bool) -> torch.nn.Module:
    """DDP or FSDP2 around ``module`` (returned unchanged in a single process)."""
    if not info.enabled:
        return module
    if strategy == "auto":
        strategy = "fsdp" if (full_finetune and info.device.type == "cuda") else "ddp"
    if strategy == "fsdp":
        return _fsdp2(module)
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(module, device_ids=[info.device.index] if info.device.type == "cuda" else None,
               find_unused_parameters=True, broadcast_buffers=False)


def _fsdp2(module: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = [m for name, m in module.named_modules()
              if type(m).__name__.endswith(("DecoderLayer", "VisionBlock", "Qwen2VLVisionBlock"))]
    for b in blocks:
        fully_shard(b, mp_policy=mp)
    fully_shard(module, mp_policy=mp)
    return module


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if hasattr(module, "module") and isinstance(
        module, torch.nn.parallel.DistributedDataParallel) else module


def no_sync(module: torch.nn.Module, active: bool):  # type: ignore[no-untyped-def]
    """Skip the DDP gradient all-reduce (all but the last accumulation chunk)."""
    if active and isinstance(module, torch.nn.parallel.DistributedDataParallel):
        return module.no_sync()
    return contextlib.nullcontext()


__all__ = ["DistInfo", "init", "shutdown", "barrier", "broadcast_object", "all_gather_object", "all_reduce_sum",
           "wrap_model", "unwrap", "no_sync"]
