"""`cocoa-train`: the three CoCoA stages (and helpers such as `cocoa-train tiny-model`)."""

import click

from ..config import config_options
from ..train.config import TrainConfig
from .common import CocoaGroup

EPILOG = """
\b
Examples:
  cocoa-train --stages 1,2,3 --data shards/ --out runs/tiny          # laptop: embedded tiny model, CPU
  cocoa-train --stages 3 --data shards/ --model Qwen/Qwen2-VL-2B-Instruct --out runs/s3-only
  torchrun --nproc_per_node 8 -m cocoa.cli.train --stages 1,2,3 --data shards/ \\
      --model Qwen/Qwen2-VL-2B-Instruct --out runs/2b --config train.yaml
\b
Stage k starts from stage k-1's output (OUT/stage{k-1}/model) when that stage is selected, else --model.
Rerunning the same command continues from the latest complete checkpoint (--resume auto).
See docs/training.md for the settings, presets and the 8-GPU recipe.
"""


@click.group(cls=CocoaGroup, invoke_without_command=True, epilog=EPILOG,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@config_options(TrainConfig)
@click.pass_context
def cli(ctx: click.Context, config: TrainConfig) -> None:
    """Train an embedding model with CoCoA stages 1, 2, 3 (bidirectional warm-up, EOS-bridged
    reconstruction under collaborative attention, InfoNCE on the EOS embedding)."""
    from ..progress import quiet_libraries

    quiet_libraries()  # transformers' / hub bars would interleave with cocoa's (subcommands included)
    if ctx.invoked_subcommand is not None:
        return
    from ..train.run import run_training

    result = run_training(config)
    for k, path in result["stages"].items():
        click.echo(f"stage {k}: {path}")


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
