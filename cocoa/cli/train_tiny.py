"""`cocoa-train tiny-model` / `cocoa-train pretrain-tiny`: the offline tiny Qwen2-VL."""

import click

from .common import not_implemented


@click.command("tiny-model")
def tiny_model() -> None:
    """Build the offline tiny Qwen2-VL (not implemented yet)."""
    not_implemented("cocoa-train tiny-model")


COMMANDS = [tiny_model]
