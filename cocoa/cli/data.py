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
    from ..progress import quiet_libraries

    quiet_libraries()  # transformers / hub / datasets bars would interleave with cocoa's output


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--rows", default=3, show_default=True, help="How many records to show.")
@click.option("--no-verify", is_flag=True,
              help="Skip the sha256 of every shard and the validation of every record (structure is still checked).")
def inspect(path: Path, rows: int, no_verify: bool) -> None:
    """Verify a dataset directory and print its manifest and first records.

    It runs the checks every reader runs (manifest, shard paths, sizes, row counts, schema, UTF-8) plus
    the sha256 of every shard and the validation of every record against its record type, so
    "verified" means no cocoa reader will reject it. The first problem is reported (file, row, rule) and
    the exit status is 1.
    """
    from rich.table import Table

    from ..records import payload_json
    from ..shards import open_dataset

    ds = open_dataset(path, verify=not no_verify)
    n_valid = None if no_verify else validate_records(ds)
    m = ds.manifest
    con = console()
    t = Table(title=f"{path} ({m.record_type}, schema v{m.schema_version})")
    t.add_column("shard")
    t.add_column("rows", justify="right")
    t.add_column("bytes", justify="right")
    t.add_column("sha256")
    for s in m.shards:
        t.add_row(s.file, str(s.num_rows), f"{s.bytes:,}", s.sha256[:16] + "…")
    t.add_row("total", str(m.num_rows), f"{sum(s.bytes for s in m.shards):,}",
              "verified" if not no_verify else "not verified")
    con.print(t)
    if no_verify:
        con.print("structure checked (paths, sizes, row counts, schema, UTF-8); sha256 and records not verified "
                  "(--no-verify)")
    else:
        con.print(f"verified: sha256 of {len(m.shards)} shards, {n_valid} records valid {m.record_type}s")
    if m.provenance:
        con.print("provenance: " + json.dumps(m.provenance, default=str)[:2000], soft_wrap=True, markup=False)
    for i, rec in enumerate(ds):
        if i >= rows:
            break
        con.print(f"{i}: " + payload_json(rec)[:600], soft_wrap=True, markup=False)


def validate_records(ds) -> int:  # type: ignore[no-untyped-def]
    """Validate every record of ``ds`` as its record type (what a reader does with each row it uses).

    Raises a :class:`cocoa.records.RecordError` naming the shard, the row and the failed rule.
    """
    from ..records import from_row

    n = 0
    for f, off, batch in ds.iter_batches():
        for j, row in enumerate(batch.to_pylist()):
            from_row(ds.record_type, row, where=f"{f} row {off + j}")
            n += 1
    return n


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
