"""`cocoa-eval`: MMEB-V1 and scenes evaluation (P@1 per dataset, meta-task, IND/OOD, overall)."""

from __future__ import annotations


import click

from ..config import config_options
from ..eval.evaluator import EvalConfig
from .common import CocoaCommand


EPILOG = """\b
Examples:
  cocoa-eval --model runs/demo/stage3/model --benchmark scenes --data demo/scenes
  cocoa-eval --model M --benchmark mmeb --mmeb-dir MMEB-eval --datasets ImageNet-1K,N24News
  cocoa-eval --model M --benchmark scenes --data demo/scenes --compare runs/base/eval-scenes/results.json
  torchrun --nproc-per-node 8 -m cocoa.cli.eval --model M --benchmark mmeb --mmeb-dir MMEB-eval
\b
P@1: candidate 0 is the positive; a query scores when the positive's cosine similarity is strictly
above every distractor's (ties count against it). Averages are unweighted means over datasets
(MMEB/VLM2Vec convention). Embeddings are cached on disk by model hash + input hash, so reruns and
added datasets encode only what is new.
"""


@click.command(cls=CocoaCommand, epilog=EPILOG,
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@config_options(EvalConfig)
def cli(config: EvalConfig) -> None:
    """Evaluate an embedding model on MMEB-V1 (--benchmark mmeb) or the scenes benchmark (--benchmark scenes).

    Prints the score table and writes results.json, results.md and results.png.
    """
    from ..eval.evaluator import run
    from ..progress import quiet_libraries

    quiet_libraries()  # transformers' "Loading weights" bar would interleave with cocoa's output

    if not config.model:
        raise click.UsageError("--model is required: a model directory saved by cocoa-train")
    if config.benchmark == "scenes" and not config.data:
        raise click.UsageError("--benchmark scenes needs --data: the root written by `cocoa-data scenes` (or its eval/ dir)")
    if config.benchmark == "mmeb" and not config.mmeb_dir:
        raise click.UsageError("--benchmark mmeb needs --mmeb-dir: a directory in the MMEB-eval layout")
    run(config)


def main() -> None:
    cli(prog_name="cocoa-eval")


if __name__ == "__main__":
    main()
