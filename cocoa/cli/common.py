"""Shared CLI plumbing: clean errors instead of tracebacks, rich console, the not-yet-built marker."""

from __future__ import annotations

import sys
from typing import Any

import click

from ..records import RecordError


class _CleanErrors:
    """Turns cocoa's own errors into one clear line and exit status 1 (no traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except RecordError as e:
            raise click.ClickException(str(e)) from None
        except FileNotFoundError as e:
            raise click.ClickException(f"{e.filename or e}: no such file or directory") from None


class CocoaGroup(_CleanErrors, click.Group):
    """A click group with cocoa's clean error reporting."""


class CocoaCommand(_CleanErrors, click.Command):
    """A click command with cocoa's clean error reporting."""


def console():  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def not_implemented(what: str) -> None:
    click.echo(f"`{what}` is not implemented yet.", err=True)
    sys.exit(2)
