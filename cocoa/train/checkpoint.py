"""Atomic, resumable training checkpoints.

Layout (one directory per checkpoint, per stage)::

    OUT/stage{k}/checkpoints/step-00000040/
        weights.safetensors     trainable parameters only (the adapter, or every weight when fully fine-tuned)
        optimizer.pt            optimizer state (keyed by parameter name, so it survives re-wrapping)
        scheduler.pt            lr scheduler state
        rng-rank{r}.pt          python / numpy / torch (+ CUDA) RNG states of every rank
        state.json              step, data position, losses so far, config hash -- written LAST

Atomicity: everything is written into ``.tmp-step-XXXXXXXX`` and renamed to ``step-XXXXXXXX`` after every
rank has written its part, so a checkpoint directory either is complete or does not exist under its
final name; leftovers of a killed writer are removed on the next save. ``latest_checkpoint`` returns the
newest directory that has its ``state.json``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from ..shards import atomic_write_json, fsync_dir
from ..errors import CocoaError

STATE = "state.json"
PREFIX = "step-"


class CheckpointError(CocoaError):
    """A checkpoint cannot be used; the message says which and what to do."""


def checkpoint_root(stage_dir: Path) -> Path:
    return Path(stage_dir) / "checkpoints"


def step_dir(stage_dir: Path, step: int) -> Path:
    return checkpoint_root(stage_dir) / f"{PREFIX}{step:08d}"


def list_checkpoints(stage_dir: Path) -> list[Path]:
    root = checkpoint_root(stage_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
            and (p / STATE).is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(stage_dir: Path) -> Path | None:
    cps = list_checkpoints(stage_dir)
    return cps[-1] if cps else None


def rng_state() -> dict[str, Any]:
    import numpy as np

    st: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters on CPU (FSDP2 DTensors are gathered: a collective, every rank calls it)."""
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach()
            if hasattr(t, "full_tensor"):
                t = t.full_tensor()
            out[n] = t.to("cpu").contiguous()
    return out


def _optimizer_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    names = {id(p): n for n, p in model.named_parameters()}
    sd = optimizer.state_dict()
    # map integer ids to names in param order
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return {"state": {order[i]: s for i, s in sd["state"].items()}, "param_groups": sd["param_groups"],
            "order": order}


def _optimizer_from_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    if sorted(order) != sorted(saved["order"]):
        raise CheckpointError(
            "the checkpoint's optimizer was built for other parameters (different --lora settings or model?); "
            "resume with the same settings or start a new run (--resume never / another --out)"
        )
    index = {n: i for i, n in enumerate(order)}
    state = {index[n]: s for n, s in saved["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def save_checkpoint(stage_dir: Path, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: dict[str, Any], rank: int = 0, world: int = 1,
                    barrier: Any = None, keep: int = 2, sharded: bool = False) -> Path:
    """Write checkpoint ``step`` atomically; every rank calls this (rank 0 writes the shared files)."""
    from safetensors.torch import save_file

    root = checkpoint_root(stage_dir)
    final = step_dir(stage_dir, step)
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for p in root.iterdir():  # leftovers of a writer killed mid-save
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
        tmp.mkdir()
    if barrier:
        barrier()
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    weights = trainable_state(model) if (sharded or rank == 0) else None
    if sharded:  # FSDP2: optimizer state is sharded like the parameters; each rank keeps its own
        torch.save(_optimizer_by_name(model, optimizer), tmp / f"optimizer-rank{rank}.pt")
    if rank == 0:
        save_file(weights, str(tmp / "weights.safetensors"))
        if not sharded:
            torch.save(_optimizer_by_name(model, optimizer), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if barrier:
        barrier()
    if rank == 0:
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        atomic_write_json(tmp / STATE, dict(state, step=step, world=world))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        for old in list_checkpoints(stage_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if barrier:
        barrier()
    return final


def _damaged(f: Path, why: str) -> CheckpointError:
    ck = f.parent
    return CheckpointError(
        f"{f}: the checkpoint is damaged ({why}); resume from an earlier checkpoint of "
        f"{ck.parent} (--resume PATH), delete {ck} to fall back to the previous one, or start over with --overwrite")


def read_state(path: Path, max_step: int | None = None) -> dict[str, Any]:
    """``path/state.json``, checked: a mapping whose ``step`` is an integer agreeing with the directory's
    name (``step-00000040``) and, given ``max_step``, within ``1..max_step``."""
    from ..fs import TextFileError, read_json

    path = Path(path)
    f = path / STATE
    if not f.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {STATE}); pick another or start over")
    try:
        state = read_json(f, fix="the checkpoint is damaged")
    except TextFileError as e:
        raise _damaged(f, str(e).split("; ")[0].replace(f"{f} ", "")) from None
    except OSError as e:
        raise _damaged(f, f"cannot read it: {e.strerror or e}") from None
    if not isinstance(state, dict):
        raise _damaged(f, f"it holds a {type(state).__name__}, not a mapping")
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        raise _damaged(f, f"'step' is {step!r}, not a step number")
    if step < 1 or (max_step is not None and step > max_step):
        raise _damaged(f, f"'step' {step} is outside 1..{max_step if max_step is not None else 'N'} "
                          "(the stage's steps)")
    if path.name.startswith(PREFIX):
        try:
            named = int(path.name[len(PREFIX):])
        except ValueError:
            named = None
        if named is not None and named != step:
            raise _damaged(f, f"'step' is {step} but the directory is {path.name}")
    world = state.get("world", 1)
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise _damaged(f, f"'world' is {world!r}, not a process count")
    return state


def _load_file(f: Path, what: str, loader: Any) -> Any:
    """``loader(f)``, or a :class:`CheckpointError` naming the file when it is missing or unreadable."""
    if not f.is_file():
        raise _damaged(f, f"its {what} file is missing")
    try:
        return loader(f)
    except CocoaError:
        raise
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # truncated / overwritten: pickle, zip, safetensors, EOF errors
        raise _damaged(f, f"its {what} cannot be read: {type(e).__name__}: {' '.join(str(e).split())[:160]}") from None


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    rank: int = 0, world: int = 1, max_step: int | None = None) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this rank's RNG; return the saved state dict.

    Every file is read (and the state checked, ``step`` within ``1..max_step``) before anything is restored;
    a damaged file is a :class:`CheckpointError` naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    state = read_state(path, max_step)
    if int(state.get("world", 1)) != world:
        raise CheckpointError(
            f"{path} was written by {state.get('world')} processes, this run has {world}; resume with the same "
            "number of processes (the data order per rank depends on it)"
        )
    weights = _load_file(path / "weights.safetensors", "weights", lambda f: load_file(str(f)))
    opt = path / f"optimizer-rank{rank}.pt"
    if not opt.is_file():
        opt = path / "optimizer.pt"
    tload = lambda f: torch.load(f, weights_only=False)  # noqa: E731
    opt_state = _load_file(opt, "optimizer state", tload)
    if not isinstance(opt_state, dict) or not {"state", "param_groups", "order"} <= set(opt_state):
        raise _damaged(opt, "it is not an optimizer state cocoa wrote")
    sched_state = _load_file(path / "scheduler.pt", "scheduler state", tload)
    if not isinstance(sched_state, dict):
        raise _damaged(path / "scheduler.pt", "it is not a scheduler state")
    rng = path / f"rng-rank{rank}.pt"
    rng_st = _load_file(rng, "random state", tload) if rng.is_file() else None
    if rng_st is not None and not (isinstance(rng_st, dict) and {"python", "numpy", "torch"} <= set(rng_st)):
        raise _damaged(rng, "it is not a random state cocoa wrote")
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    unknown = [n for n in weights if n not in params]
    if missing or unknown:
        raise CheckpointError(
            f"{path} does not fit this model ({len(missing)} trainable weights missing, {len(unknown)} unknown, "
            f"e.g. {(missing + unknown)[:2]}); resume with the same --model and --lora settings"
        )
    bad_shape = [n for n, t in weights.items() if tuple(t.shape) != tuple(params[n].shape)]
    if bad_shape:
        raise CheckpointError(f"{path} does not fit this model ({len(bad_shape)} weights of another shape, e.g. "
                              f"{bad_shape[0]}); resume with the same --model and --lora settings")
    with torch.no_grad():
        for n, t in weights.items():
            p = params[n]
            if hasattr(p, "full_tensor"):  # FSDP2 DTensor: copy this rank's shard
                from torch.distributed.tensor import distribute_tensor

                p.copy_(distribute_tensor(t.to(p.dtype), p.device_mesh, p.placements))
            else:
                p.copy_(t.to(p.device, p.dtype))
    try:
        _optimizer_from_name(model, optimizer, opt_state)
    except CocoaError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise _damaged(opt, f"it does not fit the optimizer ({type(e).__name__}: {e})") from None
    try:
        scheduler.load_state_dict(sched_state)
    except (KeyError, TypeError, ValueError) as e:
        raise _damaged(path / "scheduler.pt", f"it does not fit the schedule ({type(e).__name__}: {e})") from None
    if rng_st is not None:
        try:
            set_rng_state(rng_st)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise _damaged(rng, f"it is not a usable random state ({type(e).__name__}: {e})") from None
    return state


__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints", "CheckpointError",
           "read_state", "rng_state", "set_rng_state", "trainable_state", "step_dir"]
