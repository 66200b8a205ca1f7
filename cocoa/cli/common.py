"""Shared CLI plumbing: clean errors instead of tracebacks (a full disk and stray non-UTF-8 bytes
included), the rich console."""

from __future__ import annotations

from typing import Any

import click

from ..errors import CocoaError


class _CleanErrors:
    """Turns cocoa's own errors into one clear line and exit status 1 (no traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except CocoaError as e:
            raise click.ClickException(str(e)) from None
        except FileNotFoundError as e:
            raise click.ClickException(f"{e.filename or e}: no such file or directory") from None
        except OSError as e:
            if not is_disk_full(e):
                raise
            where = _filename(e) or "the output"
            raise click.ClickException(
                f"no space left on the device writing {where}: free some space (or write to a larger disk) and "
                "rerun the same command; what was committed is kept (an unfinished dataset stays marked "
                "incomplete, and resumable commands continue from it)"
            ) from None
        except UnicodeDecodeError as e:  # last resort: readers name their file; this names the bytes
            raise click.ClickException(
                f"input is not UTF-8 text ({e.reason} at byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                "re-encode the file as UTF-8"
            ) from None


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC / EDQUOT, also when a library (pyarrow, torch) reports it only in its message."""
    import errno

    while e is not None:
        if isinstance(e, OSError) and (e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e)
                                       or "file write failed" in str(e)):
            return True
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return False


def _filename(e: BaseException | None) -> str | None:
    while e is not None:
        if isinstance(e, OSError) and e.filename:
            return str(e.filename)
        e = e.__cause__ or e.__context__
    return None


class CocoaGroup(_CleanErrors, click.Group):
    """A click group with cocoa's clean error reporting."""


class CocoaCommand(_CleanErrors, click.Command):
    """A click command with cocoa's clean error reporting."""


def console():  # type: ignore[no-untyped-def]
    from rich.console import Console

    # soft_wrap: a line longer than the terminal (or than 80 columns in a log file) stays one line
    return Console(stderr=False, highlight=False, soft_wrap=True)
