"""`cocoa-data scenes`: materialise the procedural scenes benchmark (training pairs + MMEB-shaped eval sets)."""

from __future__ import annotations

from pathlib import Path

import click
from pydantic import Field

from ..config import Config, config_options
from .common import console


class ScenesConfig(Config):
    out: Path = Field(Path("data/scenes"), description="Output root: writes original/, eval/<Dataset>/ and benchmark.json")
    train: int = Field(20000, ge=0, description="Number of training pairs (PairRecord) across the five tasks")
    eval_per_task: int = Field(200, ge=0, description="Queries per evaluation dataset")
    distractors: int = Field(999, ge=1, description="Distractor candidates per query (MMEB uses 999; VQA is capped at its answer vocabulary, classification ranks all labels)")
    seed: int = Field(0, description="Random seed; the same seed gives byte-identical images and records")
    image_size: int = Field(112, ge=28, description="Image side in pixels (grounding crops are half of it, a multiple of 28)")
    datasets: list[str] = Field(default_factory=list, description="Evaluation datasets to build, comma-separated (default: all ten)")
    overwrite: bool = Field(False, description="Replace an existing benchmark under --out")
    contact_sheet: Path | None = Field(None, description="Also save a PNG grid of the first training images with their texts here")


@click.command("scenes")
@config_options(ScenesConfig)
def scenes(config: ScenesConfig) -> None:
    """Materialise the procedural CLEVR-style scenes benchmark.

    \b
    Writes OUT/original (training pairs for classification, VQA, text->image and image->text
    retrieval, grounding; coarse MMEB-like texts, scene graph in meta) and OUT/eval/<Dataset>
    (SceneCls, SceneVQA, SceneT2I, SceneI2T, SceneGround and their -OOD variants; candidate
    images stored once per dataset in a content-addressed images/ folder).

    \b
    Example:  cocoa-data scenes --out data/scenes --train 20000 --eval-per-task 200 --distractors 999
    """
    from ..progress import bar  # a live bar on a terminal, plain periodic lines in logs and pipes

    from ..sources.scenes import DATASETS, build_benchmark, write_contact_sheet

    unknown = [d for d in config.datasets if d not in DATASETS]
    if unknown:
        raise click.UsageError(f"unknown --datasets {unknown}; known: {', '.join(DATASETS)}")
    con = console()
    with bar(unit="items", console=con, transient=False) as prog:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = prog.add_task(stage, total=total)
            prog.update(tasks[stage], completed=done)

        summary = build_benchmark(
            config.out, n_train=config.train, eval_per_task=config.eval_per_task, n_distractors=config.distractors,
            seed=config.seed, image_size=config.image_size, datasets=config.datasets or None,
            overwrite=config.overwrite, progress=progress,
        )
    from rich.table import Table

    t = Table(title=f"scenes benchmark in {config.out} (seed {config.seed}, {config.image_size}px)")
    for col in ("dataset", "meta-task", "split", "queries", "candidates", "images"):
        t.add_column(col, justify="left" if col in ("dataset", "meta-task", "split") else "right")
    for task, n in summary["train"]["tasks"].items():
        t.add_row("original (train)", task, "IND", str(n), "1", "embedded")
    for name, info in summary["eval"].items():
        t.add_row(name, info["meta_task"], info["split"], str(info["queries"]), str(info["candidates"]), str(info["images"]))
    con.print(t)
    con.print(f"held-out colour x shape combos (OOD only): {', '.join(' '.join(c) for c in summary['held_out_combos'])}")
    if config.contact_sheet:
        p = write_contact_sheet(config.contact_sheet, seed=config.seed, image_size=config.image_size)
        con.print(f"contact sheet: {p}")


COMMANDS = [scenes]
