"""`cocoa-data curate` and `cocoa-data mix`."""

from __future__ import annotations

from pathlib import Path

import click

from ..config import config_options
from ..curation.config import CurationConfig
from .common import console


@click.command()
@click.option("--data", type=click.Path(file_okay=False, path_type=Path), default=Path("shards"), show_default=True,
              help="Workspace root: reads DATA/synthetic (and DATA/original with --eval-data), writes DATA/curated.")
@click.option("--eval-data", type=click.Path(path_type=Path), default=None,
              help="Evaluation data to decontaminate against: an EvalRecord dataset directory, a root holding "
                   "several (e.g. a scenes benchmark's eval/), or an MMEB-eval directory in its published layout "
                   "(<Dataset>/test-*.parquet + images.zip, a TIGER-Lab/MMEB-eval snapshot).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")
@click.option("--engine", type=click.Choice(["polars", "ray"]), default="polars", show_default=True,
              help="polars: one process, one frame; ray: the same rules on Ray Data (blocks, shuffles by key), the "
                   "same curated/ and rejected/ rows (docs/curation.md \"Scaling out\").")
@click.option("--ray-address", default=None,
              help="--engine ray: the cluster to join (default $RAY_ADDRESS, else a local cluster is started).")
@click.option("--workers", type=click.IntRange(1, 4096), default=None,
              help="--engine ray: blocks processed at once.  [default: 4]")
@config_options(CurationConfig)
def curate(data: Path, eval_data: Path | None, progress: bool, engine: str, ray_address: str | None, workers: int,
           config: CurationConfig) -> None:
    """Filter, deduplicate and decontaminate synthetic data: synthetic/ -> curated/.

    \b
    Rules, in order (the first failing rule names the drop):
      image_unreadable, image_too_small, image_too_large, image_aspect, length, refusal, hedge,
      meta_talk, repetition_share, repetition_run, qa_copy, qa_form, exact_dup_image,
      exact_dup_global, near_dup (MinHash LSH), image_near_dup (pHash), decontam_image, decontam_text.
    Every dropped row goes to curated/rejected/ with its rule; curated/report.json has the counts.
    With --eval-data, contaminated original/ pairs also go to curated/rejected/ and `mix` skips them.
    """
    from ..curation.pipeline import print_report, run_curation

    con = console()
    if engine == "ray":
        from ..curation.ray_engine import run_curation_ray

        result = run_curation_ray(data, config, eval_data=eval_data, show_progress=progress, console=con,
                                  address=ray_address, workers=workers or 4)
    else:
        for flag, value in (("--ray-address", ray_address), ("--workers", workers)):
            if value is not None:
                raise click.UsageError(f"{flag} needs --engine ray")
        result = run_curation(data, config, eval_data=eval_data, show_progress=progress, console=con)
    print_report(result.report, con)
    for warning in result.report.get("warnings", []):
        click.secho(f"warning: {warning}", fg="yellow", err=True)
    con.print(f"wrote {data / 'curated'} ({result.kept} rows), {data / 'curated' / 'rejected'} "
              f"({result.rejected} rows), {data / 'curated' / 'report.json'}")


def _ratio(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from ..curation.mix import RatioError, parse_ratio

    try:
        parse_ratio(value)
    except RatioError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None
    return value


@click.command()
@click.option("--ratio", default="1:1", show_default=True, callback=_ratio,
              help="original:synthetic by row count (1:1, 2:1, 0.5:1). A zero side is not used: 1:0 mixes "
                   "original pairs only (no synthetic data needed), 0:1 curated synthetic rows only.")
@click.option("--data", type=click.Path(file_okay=False, path_type=Path), default=Path("shards"), show_default=True,
              help="Workspace root: reads DATA/original and DATA/curated, writes DATA/mix.")
@click.option("--stratify/--no-stratify", default=True, show_default=True,
              help="Keep each source subset's share within its side.")
@click.option("--upsample", is_flag=True, help="Repeat rows of the short side instead of capping the long side.")
@click.option("--seed", default=0, show_default=True, type=int, help="Selection and order seed.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")
def mix(ratio: str, data: Path, stratify: bool, upsample: bool, seed: int, progress: bool) -> None:
    """Mix original pairs and curated synthetic rows at a ratio: original/ + curated/ -> mix/.

    Rows are MixRecords (image, prompt, text, stages [1, 2], provenance). When one side is short,
    the long side is capped to keep the ratio (default) or the short side is upsampled (--upsample).
    A dataset card (mix/README.md) records counts per source, the achieved ratio, the curation
    config and the inputs' checksums.
    """
    from ..curation.mix import run_mix

    con = console()
    card = run_mix(data, ratio=ratio, stratify=stratify, upsample=upsample, seed=seed, show_progress=progress,
                   console=con)
    con.print(card["note"])
    if card["original_not_mixed"]:
        con.print(f"original pairs not mixed (no image + text pair for stages 1-2): {card['original_not_mixed']}")
    con.print(f"wrote {data / 'mix'}: {card['rows']} rows ({card['original_rows']} original, "
              f"{card['synthetic_rows']} synthetic; ratio {card['ratio_achieved']}), {data / 'mix' / 'README.md'}")


COMMANDS = [curate, mix]
