"""`cocoa-data curate` and `cocoa-data mix`."""

import click

from .common import not_implemented


@click.command()
def curate() -> None:
    """Filter and deduplicate synthetic data (not implemented yet)."""
    not_implemented("cocoa-data curate")


@click.command()
def mix() -> None:
    """Mix original and curated data at a ratio (not implemented yet)."""
    not_implemented("cocoa-data mix")


COMMANDS = [curate, mix]
