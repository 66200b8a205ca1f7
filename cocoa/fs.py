"""Filesystem safety shared by every command: contained paths, exclusive locks, owned directories.

Three promises (``docs/reliability.md``):

* **Contained paths.** A path read from a file (a manifest's shard ``file``, a record's image path) is
  used only when it is relative, has no ``..`` component and, with symlinks resolved, stays inside the
  directory that file belongs to (:func:`contained`). Nothing outside a dataset or run directory is read,
  written or deleted because a file says so.
* **One writer.** A command that writes a workspace, dataset, run or cache directory holds an exclusive
  ``fcntl.flock`` on a lock file in it (:func:`exclusive_lock`). The kernel releases it when the process
  dies, so a SIGKILLed writer never leaves a stale lock; a second writer fails at once with a one-line
  error naming the holder (pid, command, start time).
* **Deleting only what is ours.** ``--overwrite`` removes a directory only when it is empty or carries
  cocoa's marker file (:data:`MARKER`, written by every command that creates a directory it may later
  replace: the whole directory is cocoa's, and anything put inside it goes with it) or is a cocoa dataset
  (has a cocoa ``manifest.json``) holding only what cocoa writes there; anything else is refused with a
  clear message naming up to three foreign entries (:func:`remove_owned_tree`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from .errors import CocoaError

MARKER = ".cocoa-owned"
LOCK = ".cocoa.lock"


class UnsafePathError(CocoaError):
    """A path read from a file points outside the directory it belongs to."""


class LockedError(CocoaError):
    """Another cocoa process holds the directory's lock."""


class NotWritableError(LockedError):
    """The directory's lock file cannot be created: the directory is not writable (permissions, a read-only
    filesystem, a file in the way)."""


class NotOwnedError(CocoaError):
    """A directory cocoa was asked to delete is not one cocoa made."""


class TextFileError(CocoaError):
    """A text file (YAML, JSON, template) cocoa reads is not UTF-8 or not parseable."""


# ---------------------------------------------------------------------------------------------
# text files: UTF-8 or a one-line error naming the file and the byte
# ---------------------------------------------------------------------------------------------
def read_text(path: str | Path, *, fix: str = "save it as UTF-8 text") -> str:
    """The file's text, decoded as UTF-8 (a leading BOM is dropped); otherwise a :class:`TextFileError`
    naming the file, the byte offset and the bad byte (never a bare ``UnicodeDecodeError``)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise TextFileError(
            f"{path}: not UTF-8 text (byte {e.start}, line {line}: {data[e.start:e.start + 1]!r}); {fix}"
        ) from None


def read_json(path: str | Path, *, fix: str = "regenerate it") -> object:
    """Parse a JSON file; non-UTF-8 bytes or bad JSON give a :class:`TextFileError` naming the file."""
    text = read_text(path, fix=fix)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TextFileError(f"{path} is not valid JSON ({e}); {fix}") from None
    except RecursionError:
        raise TextFileError(f"{path} is not usable JSON (nested too deeply); {fix}") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise TextFileError(f"{path} is not usable JSON ({str(e)[:120]}); {fix}") from None


# ---------------------------------------------------------------------------------------------
# contained paths
# ---------------------------------------------------------------------------------------------
def contained(root: str | Path, rel: str, *, where: str, file: bool = False) -> Path:
    """``root / rel`` when ``rel`` is a relative POSIX path that stays inside ``root``; else refuse.

    Refused: empty, absolute (``/x``, ``C:\\x``, ``\\\\host``), any ``..`` component, backslashes, NUL,
    and anything whose resolved path (symlinks followed) leaves ``root``'s resolved path.
    ``where`` names the file the path came from, for the message. ``file=True`` also refuses a path
    that names a directory (``"."``, ``"sub/"``): the caller wants a file there.
    """
    bad = None
    if not isinstance(rel, str) or not rel:
        bad = "is empty"
    elif "\x00" in rel or "\\" in rel:
        bad = "contains a NUL or backslash"
    else:
        p = PurePosixPath(rel)
        if p.is_absolute() or (len(rel) > 1 and rel[1] == ":"):
            bad = "is absolute"
        elif any(part == ".." for part in p.parts):
            bad = "climbs out with '..'"
    if bad is None:
        root_r = Path(root).resolve()
        full = Path(root) / rel
        try:
            full.resolve().relative_to(root_r)
        except ValueError:
            bad = "resolves (through a symlink) outside the directory"
        else:
            if file and (full.resolve() == root_r or full.is_dir()):
                bad = "is a directory, not a file"
    if bad is not None:
        raise UnsafePathError(
            f"{where}: path {rel!r} {bad}; cocoa only uses paths inside {root}. The file was edited or "
            "is not cocoa's: regenerate it"
        )
    return Path(root) / rel


# ---------------------------------------------------------------------------------------------
# exclusive locks
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def exclusive_lock(directory: str | Path, *, name: str = LOCK, what: str = "") -> Iterator[Path]:
    """Hold an exclusive, non-blocking ``flock`` on ``directory/name`` for the ``with`` block.

    A second holder fails at once with :class:`LockedError` naming the first (pid, command, since).
    The kernel drops the lock when its process dies (SIGKILL included): no stale lock to clean up.
    The lock file itself is left in place (removing it would race with a new holder).
    """
    directory = Path(directory)
    path = directory / name
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # permissions, a read-only filesystem (EROFS), a full disk, a file in the way, ...
        raise NotWritableError(
            f"{directory} is not writable (cannot create its lock file {name}: {e.strerror or e}); a command that "
            "writes there needs a writable directory: fix the permissions or mount, or choose another directory"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = _read_holder(fd)
            raise LockedError(
                f"{directory} is in use by another cocoa process{holder}; "
                f"{what + ' ' if what else ''}wait for it to finish (or stop it) and run the command again. "
                "Two writers on one directory would corrupt it"
            ) from None
        info = {"pid": os.getpid(), "command": " ".join(sys.argv[:4])[:200], "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing releases the flock


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "{}")
        return f" (pid {info.get('pid')}, `{info.get('command')}`, since {info.get('since')})"
    except (OSError, ValueError):
        return ""


def is_locked(directory: str | Path, *, name: str = LOCK) -> bool:
    """Whether another process holds ``directory/name`` right now (for status displays and tests)."""
    path = Path(directory) / name
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


# ---------------------------------------------------------------------------------------------
# owned directories
# ---------------------------------------------------------------------------------------------
def mark_owned(directory: str | Path, kind: str) -> None:
    """Create ``directory`` (if needed) and record that cocoa made it (``kind``: workspace, run, ...)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    m = directory / MARKER
    if not m.exists():
        m.write_text(json.dumps({"kind": kind, "created": time.time()}) + "\n")


def is_owned(directory: str | Path) -> bool:
    """A directory cocoa may delete on ``--overwrite``: it carries the marker (the whole directory is cocoa's:
    whatever else was put inside goes with it), or it is a cocoa dataset (a cocoa ``manifest.json``) that
    holds nothing cocoa does not write there (:func:`foreign_entries`)."""
    directory = Path(directory)
    if directory.is_symlink():
        return False
    if (directory / MARKER).is_file():
        return True
    return _is_cocoa_dataset(directory) and not foreign_entries(directory, limit=1)


def _is_cocoa_dataset(directory: Path) -> bool:
    mf = directory / "manifest.json"
    if mf.is_file():
        try:
            return json.loads(mf.read_bytes()).get("format") == "cocoa-shards"
        except (ValueError, OSError, AttributeError, RecursionError):
            return False
    return False


# What cocoa writes inside a dataset directory (a ``manifest.json`` directory without the marker):
# ``--overwrite`` deletes such a directory only when it holds nothing else (checked by the writers' names:
# shards.ShardWriter, synth's merge lock and parts, scenes/MMEB-eval images, curate/mix reports).
_SHARD_FILE = re.compile(r"^shard(?:-\d{10})?-\d{5}\.arrow$")
_DATASET_FILES = {"manifest.json", "README.md", "report.json", "benchmark.json", "mix_report.json", ".merge.lock"}
_TEMP_FILE = re.compile(r"^\.(?:shard(?:-\d{10})?-\d{5}\.arrow|manifest\.json|README\.md|report\.json|benchmark\.json"
                        r"|mix_report\.json)\.tmp-[0-9a-f]+$")
_SUB_DATASETS = {"quarantine", "rejected"}
_PART_DIR = re.compile(r"^part-\d{5}-of-\d{5}$")
_IMAGE_FILE = re.compile(r"^[0-9a-f]{8,}\.(?:png|jpg)$")


def foreign_entries(directory: str | Path, limit: int = 3) -> list[str]:
    """Up to ``limit`` entries (relative paths) inside the dataset ``directory`` that cocoa does not write
    there: anything but its manifest, shards and their temporary files, ``.cocoa*`` bookkeeping, its
    sub-datasets (``parts/``, ``quarantine/``, ``rejected/``), ``images/`` and its reports."""
    root = Path(directory)
    found: list[str] = []

    def note(p: Path) -> bool:
        found.append(str(p.relative_to(root)) + ("/" if p.is_dir() and not p.is_symlink() else ""))
        return len(found) >= limit

    def dataset(d: Path) -> bool:
        for p in sorted(d.iterdir()):
            name = p.name
            if p.is_symlink():
                if note(p):
                    return True
            elif p.is_dir():
                if name in _SUB_DATASETS:
                    if dataset(p):
                        return True
                elif name == "parts":
                    for q in sorted(p.iterdir()):
                        if q.is_symlink() or not q.is_dir() or not _PART_DIR.match(q.name):
                            if note(q):
                                return True
                        elif dataset(q):
                            return True
                elif name == "images":
                    for q in sorted(p.iterdir()):
                        if q.is_symlink() or not q.is_dir() or not re.fullmatch(r"[0-9a-f]{2}", q.name):
                            if note(q):
                                return True
                            continue
                        for f in sorted(q.iterdir()):
                            if f.is_symlink() or not f.is_file() or not _IMAGE_FILE.match(f.name):
                                if note(f):
                                    return True
                elif note(p):
                    return True
            elif not (name in _DATASET_FILES or _SHARD_FILE.match(name) or _TEMP_FILE.match(name)
                      or name.startswith(".cocoa")):
                if note(p):
                    return True
        return False

    dataset(root)
    return found


def has_content(directory: str | Path) -> bool:
    """Whether ``directory`` holds anything besides cocoa's marker and lock files."""
    directory = Path(directory)
    return directory.is_dir() and any(not _is_cocoa_bookkeeping(p.name) for p in directory.iterdir())


def _is_cocoa_bookkeeping(name: str) -> bool:
    """The marker and the lock files (``.cocoa.lock``, ``.cocoa-eval.lock``, synth's part locks)."""
    return name == MARKER or (name.startswith(".cocoa") and name.endswith(".lock"))


def check_removable(directory: str | Path, *, flag: str = "--overwrite") -> None:
    """Raise :class:`NotOwnedError` if :func:`remove_owned_tree` would refuse ``directory``; delete nothing.
    (Commands call it before any work, so a refusal never comes after an hour of computing.)"""
    directory = Path(directory)
    if not directory.exists() and not directory.is_symlink():
        return
    if directory.is_symlink():
        raise NotOwnedError(f"{directory} is a symbolic link; {flag} will not delete through it. Remove it yourself "
                            "or choose another directory")
    if not directory.is_dir():
        raise NotOwnedError(f"{directory} is a file, not a directory cocoa made; {flag} will not delete it. "
                            "Choose another path")
    resolved = directory.resolve()
    protected = {Path("/"), Path.home().resolve(), *Path.cwd().resolve().parents, Path.cwd().resolve()}
    if resolved in protected:
        raise NotOwnedError(f"{directory} ({resolved}) is the working directory, one of its parents or your home; "
                            f"{flag} never deletes it. Choose a subdirectory as the output")
    if has_content(directory) and not is_owned(directory):
        if not directory.is_symlink() and not (directory / MARKER).is_file() and _is_cocoa_dataset(directory):
            foreign = foreign_entries(directory)
            raise NotOwnedError(
                f"{directory} is a cocoa dataset but also holds files cocoa did not write there "
                f"({', '.join(foreign)}); {flag} would delete them with it, so it deletes nothing. Move them "
                "out of the dataset (or delete them yourself) and run the command again"
            )
        raise NotOwnedError(
            f"{directory} is not empty and was not made by cocoa: it holds files cocoa did not write (no {MARKER} "
            f"marker or cocoa manifest); {flag} only deletes cocoa's own output. Remove it yourself if you mean it, "
            "or choose another directory"
        )


def remove_owned_tree(directory: str | Path, *, flag: str = "--overwrite", keep_lock: bool = False) -> None:
    """Delete ``directory`` if it is empty or cocoa's (:func:`is_owned`); refuse anything else.

    Refuses the current directory, its ancestors, the home directory and ``/`` whatever they hold. A
    symlink is never followed: the link is refused (cocoa did not make it). ``keep_lock=True`` empties
    the directory but keeps it, its marker and its lock file (for a caller that holds that lock).
    """
    directory = Path(directory)
    check_removable(directory, flag=flag)
    if not directory.exists():
        return
    if not keep_lock:
        shutil.rmtree(directory)
        return
    for child in directory.iterdir():
        if _is_cocoa_bookkeeping(child.name):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
