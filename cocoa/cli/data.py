"""`cocoa-data`: build sources, synthesise, curate and mix training data."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .common import CocoaGroup, console


@click.group(cls=CocoaGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="cocoa")
def cli() -> None:
    """Data side of cocoa: source pairs -> teacher synthesis -> curation -> mixture.

    \b
    Workspace (default ./shards):
      original/    source pairs (PairRecord)        synthetic/  teacher output (+ quarantine/)
      curated/     filtered synthetic (+ rejected/) mix/        original + curated at a ratio
    """


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--rows", default=3, show_default=True, help="How many records to show.")
@click.option("--no-verify", is_flag=True, help="Skip sha256 verification of shards.")
def inspect(path: Path, rows: int, no_verify: bool) -> None:
    """Verify a dataset directory and print its manifest and first records."""
    from rich.table import Table

    from ..records import payload_json
    from ..shards import open_dataset

    ds = open_dataset(path, verify=not no_verify)
    m = ds.manifest
    con = console()
    t = Table(title=f"{path} ({m.record_type}, schema v{m.schema_version})")
    t.add_column("shard")
    t.add_column("rows", justify="right")
    t.add_column("bytes", justify="right")
    t.add_column("sha256")
    for s in m.shards:
        t.add_row(s.file, str(s.num_rows), f"{s.bytes:,}", s.sha256[:16] + "…")
    t.add_row("total", str(m.num_rows), f"{sum(s.bytes for s in m.shards):,}", "verified" if not no_verify else "")
    con.print(t)
    if m.provenance:
        con.print("provenance: " + json.dumps(m.provenance, default=str)[:2000], soft_wrap=True, markup=False)
    for i, rec in enumerate(ds):
        if i >= rows:
            break
        con.print(f"{i}: " + payload_json(rec)[:600], soft_wrap=True, markup=False)


def _register() -> None:
    # Each subcommand lives in its own module (one owner each); heavy imports stay inside commands.
    from . import data_curate, data_scenes, data_synth

    for mod in (data_scenes, data_synth, data_curate):
        for cmd in mod.COMMANDS:
            cli.add_command(cmd)


_register()


def main() -> None:
    cli(prog_name="cocoa-data")


if __name__ == "__main__":
    main()
