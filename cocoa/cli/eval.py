"""`cocoa-eval`: MMEB-V1 and scenes evaluation."""

import click

from .common import CocoaGroup, not_implemented


@click.group(cls=CocoaGroup, invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Evaluate an embedding model on MMEB-V1 or the scenes benchmark (not implemented yet)."""
    if ctx.invoked_subcommand is None:
        not_implemented("cocoa-eval")


def main() -> None:
    cli(prog_name="cocoa-eval")


if __name__ == "__main__":
    main()
