"""`cocoa-train`: the three CoCoA stages (and helpers such as `cocoa-train tiny-model`)."""

import click

from .common import CocoaGroup, not_implemented


@click.group(cls=CocoaGroup, invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Train an embedding model with CoCoA stages 1, 2, 3 (not implemented yet)."""
    if ctx.invoked_subcommand is None:
        not_implemented("cocoa-train")


def _register() -> None:
    # Model-building helpers (tiny offline model, generative pre-training) live in their own module.
    from . import train_tiny

    for cmd in train_tiny.COMMANDS:
        cli.add_command(cmd)


_register()


def main() -> None:
    cli(prog_name="cocoa-train")


if __name__ == "__main__":
    main()
