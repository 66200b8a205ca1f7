"""`cocoa-data scenes`: materialise the procedural scenes benchmark."""

import click

from .common import not_implemented


@click.command()
def scenes() -> None:
    """Materialise the procedural CLEVR-style scenes benchmark (not implemented yet)."""
    not_implemented("cocoa-data scenes")


COMMANDS = [scenes]
