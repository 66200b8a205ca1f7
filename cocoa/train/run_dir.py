"""The run directory (``--out``): refuse one cocoa-train must neither write into nor delete, apply
``--overwrite``, mark it as a run, and refuse a rerun whose settings differ for a stage that already
started (naming each difference); the settings that decide what a stage computes, and their hash.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .config import ConfigError, TrainConfig
from .preflight import TrainError
from ..errors import CocoaError


def stage_done(stage_dir: Path) -> bool:
    """The stage saved its model (``OUT/stageK/model`` with ``cocoa.json`` and ``config.json``)."""
    m = stage_dir / "model"
    return (m / "cocoa.json").is_file() and (m / "config.json").is_file()


# Settings that never change what a finished step computed: a rerun may change them freely.
_FREE = ("out", "resume", "overwrite", "progress", "tensorboard", "num_workers", "log_every", "stages", "keep_checkpoints",
         "on_bad_row", "preset")  # the preset is resolved into the values compared below; a run may be moved (out)
_FREE_STAGE = ("save_every",)
_STAGE_KEYS = tuple(f"stage{k}" for k in (1, 2, 3))


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def run_settings(config: TrainConfig, stages: Any = (1, 2, 3)) -> dict[str, Any]:
    """The settings that decide what stages ``stages`` compute, flattened (``stage3.batch_size``, ``lora.r``).

    Run-wide settings (model, data, seed, lora, precision, tokens, ...) count for every stage; a stage's own
    section counts only for that stage. Display-only and bookkeeping settings (:data:`_FREE`) never count."""
    d = config.model_dump(mode="json")
    flat: dict[str, Any] = {}
    for key, v in d.items():
        if key in _FREE or key in _STAGE_KEYS:
            continue
        flat.update(_flat(v, f"{key}."))
    for k in stages:
        for key, v in d[f"stage{k}"].items():
            if key not in _FREE_STAGE:
                flat[f"stage{k}.{key}"] = v
    return flat


def config_hash(config: TrainConfig, stages: Any = (1, 2, 3)) -> str:
    return hashlib.sha256(json.dumps(run_settings(config, stages), sort_keys=True).encode()).hexdigest()[:16]


def settings_diff(old: TrainConfig, new: TrainConfig, stages: Any) -> list[tuple[str, Any, Any]]:
    """``[("stage1.lr", 0.0001, 0.001), ...]``: the settings of ``stages`` that differ between two configs."""
    a, b = run_settings(old, stages), run_settings(new, stages)
    return [(key, a.get(key), b.get(key)) for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def _flag(key: str) -> str:
    """``stage3.batch_size`` -> ``--stage3-batch-size``; ``lora.r`` -> ``--lora-r``."""
    return "--" + key.replace(".", "-").replace("_", "-")


def started_stages(out: Path) -> list[int]:
    """Stages of the run in ``out`` that saved anything (a checkpoint or their model)."""
    return [k for k in (1, 2, 3) if (out / f"stage{k}").is_dir() and any((out / f"stage{k}").iterdir())]


# What cocoa-train writes in a run directory (anything else there means the directory is not only a run).
_RUN_LAYOUT = {"config.yaml", "metrics.jsonl", "stage1", "stage2", "stage3", "tensorboard", ".cocoa.lock",
               ".cocoa-owned"}
# Keys every config.yaml cocoa-train ever wrote holds (it writes the full resolved settings).
_RUN_KEYS = {"data", "model", "out", "stages", "preset", "seed", "lora", "stage1", "stage2", "stage3"}


def _is_cocoa_run(out: Path) -> bool:
    """``out`` carries the run marker, or (runs made before the marker existed) is laid out as a cocoa-train
    run: only cocoa-train's entries, and a config.yaml holding the full resolved settings cocoa-train writes
    (an empty or hand-written config.yaml that TrainConfig merely accepts is not enough)."""
    import yaml

    from ..fs import MARKER

    marker = out / MARKER
    if marker.is_file():
        try:
            return json.loads(marker.read_bytes()).get("kind") == "run"
        except (ValueError, OSError, AttributeError):
            return False
    prev = out / "config.yaml"
    if not prev.is_file() or prev.is_symlink():
        return False
    try:
        if any(p.name not in _RUN_LAYOUT for p in out.iterdir()):
            return False
        data = yaml.safe_load(prev.read_bytes())
        if not isinstance(data, dict) or not _RUN_KEYS <= set(data):
            return False
        if not all(isinstance(data[f"stage{k}"], dict) and "lr" in data[f"stage{k}"] for k in (1, 2, 3)):
            return False
        TrainConfig.from_yaml(prev)
        return True
    except (CocoaError, ConfigError, OSError, yaml.YAMLError, RecursionError):
        return False


def check_out_dir(config: TrainConfig) -> None:
    """Refuse an ``--out`` that cocoa-train must neither write into nor delete, before anything is created
    in it: a file, or a non-empty directory that is not a cocoa run (a workspace, a dataset, your files)."""
    from ..fs import has_content

    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file; give a directory for the run")
    if out.is_symlink() and config.overwrite:
        raise TrainError(f"--out {out} is a symbolic link; --overwrite will not delete through it. Give the real "
                         "directory or another --out")
    if has_content(out) and not _is_cocoa_run(out):
        raise TrainError(
            f"--out {out} is not empty and is not a cocoa-train run directory (no run marker, and no "
            f"config.yaml cocoa-train wrote with only a run's files beside it); cocoa-train will not write into it{' or delete it (--overwrite)' if config.overwrite else ''}."
            " Choose a new or empty directory for --out")
    if config.overwrite and has_content(out):
        from ..fs import MARKER, check_removable, mark_owned

        if not (out / MARKER).exists():
            mark_owned(out, "run")  # a run made before the marker existed (its config.yaml is cocoa-train's)
        check_removable(out)  # never the working directory, its parents or home, whatever they hold


def prepare_run_dir(config: TrainConfig, is_main: bool) -> None:
    """Rank 0, holding the run lock: apply --overwrite (only to a cocoa run), mark the directory as a run,
    refuse a rerun whose settings differ for a stage that already started (naming them), save config.yaml."""
    from ..fs import has_content, mark_owned, remove_owned_tree
    from ..shards import atomic_write_text

    out = Path(config.out)
    if not is_main:
        return
    check_out_dir(config)
    if config.overwrite and has_content(out):
        remove_owned_tree(out, keep_lock=True)
    mark_owned(out, "run")
    existing = has_content(out)
    if existing and config.resume == "never":
        raise TrainError(f"{out} already holds a run; pass --resume auto to continue it, --overwrite to start "
                         "over, or choose another --out")
    prev = out / "config.yaml"
    if existing and prev.is_file():
        old = TrainConfig.from_yaml(prev)
        started = started_stages(out)
        diff = settings_diff(old, config, started) if started else []
        if diff:
            shown = "; ".join(f"{_flag(key)} was {a!r}, now {b!r}" for key, a, b in diff[:8])
            more = f" (and {len(diff) - 8} more)" if len(diff) > 8 else ""
            raise TrainError(
                f"{out} was started with other settings for stage{'s' if len(started) > 1 else ''} "
                f"{','.join(map(str, started))} (already started): {shown}{more}. Resuming with different ones would "
                "mix runs: use the run's settings (they are in " + str(prev) + "), --overwrite to start over, or "
                "another --out. Settings of stages that have not started may change")
    atomic_write_text(out / "config.yaml", config.to_yaml())


__all__ = ["check_out_dir", "prepare_run_dir", "run_settings", "settings_diff", "config_hash", "started_stages",
           "stage_done"]
