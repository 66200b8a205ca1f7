"""`cocoa-data synth`: teacher synthesis of captions and QA."""

import click

from .common import not_implemented


@click.command()
def synth() -> None:
    """Write fine-grained captions and QA with a teacher VLM (not implemented yet)."""
    not_implemented("cocoa-data synth")


COMMANDS = [synth]
