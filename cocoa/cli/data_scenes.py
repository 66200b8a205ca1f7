"""`cocoa-data scenes`: materialise the procedural scenes benchmark (training pairs + MMEB-shaped eval sets)."""

from __future__ import annotations

from pathlib import Path

import click
from pydantic import Field, ValidationInfo, field_validator

from ..config import Config, config_options
from .common import console


# Upper bounds: a typo (--image-size 100000) must fail at once, not be killed for memory an hour later.
# Scenes are drawn at SUPERSAMPLE (2) x the side in RGBA, so a 2048 px image is ~67 MB while it is drawn.
MAX_IMAGE_SIZE = 2048
MAX_TRAIN = 100_000_000
MAX_EVAL_PER_TASK = 1_000_000
MAX_DISTRACTORS = 10_000  # MMEB uses 999; every query renders its candidates


class ScenesConfig(Config):
    out: Path = Field(Path("data/scenes"), description="Output root: writes original/, eval/<Dataset>/ and benchmark.json")
    train: int = Field(20000, ge=0, le=MAX_TRAIN, description="Number of training pairs (PairRecord) across the five tasks")
    eval_per_task: int = Field(200, ge=0, le=MAX_EVAL_PER_TASK, description="Queries per evaluation dataset")
    distractors: int = Field(999, ge=1, le=MAX_DISTRACTORS, description="Distractor candidates per query (MMEB uses 999; VQA is capped at its answer vocabulary, classification ranks all labels)")
    seed: int = Field(0, description="Random seed; the same seed gives byte-identical images and records")
    image_size: int = Field(112, ge=28, le=MAX_IMAGE_SIZE, description="Image side in pixels (grounding crops are half of it, a multiple of 28; at most 2048: scenes are drawn at twice the side)")
    datasets: list[str] = Field(default_factory=list, description="Evaluation datasets to build, comma-separated (default: all ten)")
    overwrite: bool = Field(False, description="Replace an existing benchmark under --out")
    contact_sheet: Path | None = Field(None, description="Also save a PNG grid of the first training images with their texts here")

    @field_validator("train", "eval_per_task", "distractors", "seed", "image_size", mode="before")
    @classmethod
    def _v_strict_int(cls, value: object, info: ValidationInfo) -> object:
        if isinstance(value, bool):  # YAML `train: true` is not a count (pydantic would read it as 1)
            raise ValueError(f"expected a whole number, not {str(value).lower()}")
        return value

    @field_validator("out", "contact_sheet", mode="before")
    @classmethod
    def _v_path(cls, value: object, info: ValidationInfo) -> object:
        if isinstance(value, str) and not value.strip():
            flag = "--" + (info.field_name or "").replace("_", "-")
            raise ValueError(f"{flag} is empty; name a path (an empty path would write into the current directory)")
        return value


def check_contact_sheet(path: Path) -> None:
    """Refuse a --contact-sheet path that cannot be written, before the benchmark is built."""
    import os

    if path.is_dir():
        raise click.UsageError(f"--contact-sheet {path} is a directory; name a PNG file such as {path / 'sheet.png'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise click.UsageError(f"--contact-sheet {path}: {parent} is not a directory; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise click.UsageError(f"--contact-sheet {path} cannot be written (no write permission in {parent}); "
                               "choose another path")


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
    if config.contact_sheet:
        check_contact_sheet(config.contact_sheet)
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
