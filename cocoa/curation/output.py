"""Writing a workspace output directory (``curated/``, ``mix/``) so that nothing else is ever touched.

``curate`` and ``mix`` rebuild their output from scratch on every run. They never read the old output's
manifest to decide what to delete (a tampered manifest could name any file on disk). Instead:

1. the whole workspace is locked (:func:`workspace_lock`): a second ``curate``/``mix`` (or another cocoa
   writer holding the workspace lock) fails at once with a one-line error naming the holder;
2. the new output is written into a hidden sibling ``.NAME.tmp-PID`` that carries cocoa's marker;
3. only when it is complete, the old directory is renamed aside and the new one renamed into place
   (a reader sees the old output or the new one, never a half-written one), and the old directory is
   deleted with :func:`cocoa.fs.remove_owned_tree`: only when it is cocoa's (marker or cocoa manifest) or
   empty. A directory that holds someone else's files is refused *before* any work starts.

Leftover ``.NAME.tmp-*`` / ``.NAME.old-*`` directories of a killed run are removed by the next run (they
carry the marker, and the lock guarantees nobody else is writing them).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from ..fs import (LockedError, NotOwnedError, check_removable, exclusive_lock, is_locked, mark_owned,
                  remove_owned_tree)
from ..shards import ShardError, fsync_dir


def check_replaceable(path: Path, command: str) -> None:
    """Refuse (before any work) an output path that ``command`` could not delete safely afterwards: the
    same rules :func:`cocoa.fs.remove_owned_tree` applies when it swaps the new output in."""
    check_removable(path, flag=f"`{command}`")


@contextlib.contextmanager
def workspace_lock(root: Path, command: str, missing_hint: str) -> Iterator[None]:
    """Hold the workspace's exclusive lock (``ROOT/.cocoa.lock``) for the ``with`` block."""
    if not root.is_dir():
        raise ShardError(f"workspace {root} does not exist: {missing_hint}")
    with exclusive_lock(root, what=""):
        # synth workers lock their own part (so sharded workers run side by side): while one runs,
        # synthetic/ and original/ are being written and are not ready to curate or mix
        for f in sorted(root.glob(".cocoa-synth-*.lock")):
            if is_locked(root, name=f.name):
                raise LockedError(
                    f"`cocoa-data synth` is writing {root} ({f.name}{_holder(f)}); wait for it to finish and run "
                    f"`{command}` again"
                )
        yield


def _holder(lock: Path) -> str:
    import json

    try:
        info = json.loads(lock.read_text(encoding="utf-8", errors="replace") or "{}")
        return f": pid {info.get('pid')}, since {info.get('since')}"
    except (OSError, ValueError, AttributeError):
        return ""


@contextlib.contextmanager
def staged_output(final: Path, kind: str, command: str) -> Iterator[Path]:
    """Yield an empty staging directory; on success it replaces ``final`` (see the module docstring).

    Call it while holding the workspace lock. On an exception the staging directory is removed and
    ``final`` is left exactly as it was.
    """
    check_replaceable(final, command)
    parent = final.parent
    for stale in sorted([*parent.glob(f".{final.name}.tmp-*"), *parent.glob(f".{final.name}.old-*")]):
        remove_owned_tree(stale, flag=f"`{command}`")
    stage = parent / f".{final.name}.tmp-{os.getpid()}"
    mark_owned(stage, kind)
    try:
        yield stage
    except BaseException:
        with contextlib.suppress(OSError, NotOwnedError):
            remove_owned_tree(stage, flag=f"`{command}`")
        raise
    old = parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.rename(final, old)
    os.rename(stage, final)
    fsync_dir(parent)
    if old.exists():
        remove_owned_tree(old, flag=f"`{command}`")
