"""`cocoa-data synth`: teacher synthesis of fine-grained captions and QA."""

from __future__ import annotations

import json
import signal
from typing import Any

import click

from ..config import config_options
from ..datagen.synth import SynthConfig
from .common import console


@click.command(context_settings={"max_content_width": 110})
@config_options(SynthConfig)
def synth(config: SynthConfig) -> None:
    """Write fine-grained captions and QA pairs for every source image with a teacher.

    \b
    Reads source pairs (--source scenes|mmeb) and writes, under --out (default ./shards):
      original/               the source pairs (PairRecord)
      synthetic/              teacher output (SynthRecord: one per caption / per QA pair)
      synthetic/quarantine/   output that failed validation after retries (raw text + reason)
    Resumable: rerun the same command after a crash or kill; finished work is skipped.
    Split across workers with --shard-index i --num-shards n (same flags otherwise); one
    process per part at a time (a second one on the same --out and part stops at once).
    Zero usable source pairs is an error (exit 1); a quarantined share above 10% is a warning.

    \b
    Defaults per backend: --max-tokens 768 --max-retries 2 (vllm, openai); the transformers
    teacher (often on a CPU for a first try) uses --max-tokens 256 --max-retries 1. Raise them
    for long captions or a larger --qa-per-image, e.g. --max-tokens 768 --max-retries 2.

    \b
    Examples:
      cocoa-data synth --source scenes --out shards/
      cocoa-data synth --source mmeb --mmeb-dir /data/MMEB-train --backend vllm
      cocoa-data synth --source mmeb --backend openai --base-url http://127.0.0.1:8000/v1 \\
          --model Qwen/Qwen2.5-VL-7B-Instruct --concurrency 64
      cocoa-data synth --source mmeb --limit 20 --dry-run
    """
    from ..datagen.synth import Synthesizer

    if config.engine == "ray" and not config.dry_run:
        from ..datagen.synth.ray_engine import RaySynthesizer as Synthesizer  # type: ignore[assignment]
    con = console()
    if config.dry_run:
        s = Synthesizer(config, console=con).run()
        _print_dry_run(con, config, s)
        return
    previous = _sigterm_as_interrupt()
    try:
        s = Synthesizer(config, console=con).run()
    except KeyboardInterrupt:
        con.print("[yellow]interrupted: finished work is committed; rerun the same command to continue[/yellow]")
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    _print_summary(con, s)
    warning = s.quarantine_warning()
    if warning:
        click.secho(f"warning: {warning}", fg="yellow", err=True)


def _sigterm_as_interrupt() -> Any:
    """Preemption (Slurm, Kubernetes) sends SIGTERM: commit finished work, then stop."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _print_dry_run(con: Any, config: SynthConfig, s: Any) -> None:
    from rich.panel import Panel

    for ex in s.examples:
        con.print(Panel(ex["prompt"], title=f"{ex['task']} · {ex['kind']} · {ex['source']} ({ex['role']} image)",
                        subtitle=f"template {ex['template']} · key {ex['key'][:16]}…"))
    todo = s.requests - s.skipped
    con.print(f"dry run: {s.pairs} pairs -> {s.requests} requests for worker {config.shard_index}/{config.num_shards} "
              f"({s.skipped} already done, {todo} to generate); nothing generated or written")


def _print_summary(con: Any, s: Any) -> None:
    from rich.table import Table

    t = Table(title=f"cocoa-data synth -> {s.out}", show_header=False)
    t.add_column("", style="bold")
    t.add_column("", justify="right")
    dt = max(s.seconds, 1e-6)
    rows = [
        ("source pairs read", s.pairs), ("pairs written to original/", s.originals),
        ("requests (this worker)", s.requests), ("already done (skipped)", s.skipped),
        ("ok", s.ok), ("retried", s.retried), ("quarantined", s.quarantined),
        ("records written", ", ".join(f"{k} {v}" for k, v in sorted(s.records.items())) or "0"),
        ("quarantine reasons", ", ".join(f"{k} {v}" for k, v in sorted(s.reasons.items())) or "-"),
        ("tokens (prompt / generated)", f"{s.prompt_tokens} / {s.completion_tokens}"),
        ("images/s", f"{s.images / dt:.2f}"),
        ("tokens/s generated (in the teacher / wall)",
         f"{s.throughput()['generated_tokens_per_s']:.0f} / {s.completion_tokens / dt:.0f}"),
        ("wall time", f"{s.seconds:.1f} s"),
        ("dataset complete", "yes" if s.complete else "no (other workers still running?)"),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    con.print(t)
    click.echo(json.dumps({"summary": s.as_dict()}, default=str))


COMMANDS = [synth]
