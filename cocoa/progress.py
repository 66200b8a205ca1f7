"""Progress output shared by every cocoa command: rich bars on a terminal, plain lines everywhere else.

* :func:`Progress` is a drop-in for ``rich.progress.Progress(*columns, console=..., disable=...)``. On an
  interactive terminal (stdout and stderr both TTYs) it returns rich's live bar. Otherwise -- CI logs,
  ``| tee``, ``> log 2>&1``, a notebook -- it returns :class:`PlainProgress`, which prints one complete,
  untruncated line per task every ``COCOA_PROGRESS_INTERVAL`` seconds (default 10) and when the task
  finishes, e.g.::

      stage 1: 40/100 (40%) loss 3.4192 lr 1.00e-04 | 2.31 steps/s, elapsed 0:00:17, ETA 0:00:26

  (rich, asked to draw a live bar on a non-terminal, prints a single 80-column render at the end, cut
  with ellipses: ``stage 1 ━━━━ 100/… loss 3.4192 … ETA 0:00:…``.) ``COCOA_PROGRESS=rich|plain|off``
  overrides the choice.
* :func:`quiet_libraries` switches off the progress bars of libraries cocoa drives but does not own
  (transformers' "Loading weights" / "Writing model shards", huggingface_hub downloads, datasets' map
  bars), through their official switches; every cocoa command calls it at start. A user who wants them
  back sets ``HF_HUB_DISABLE_PROGRESS_BARS=0`` (that choice is respected).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

ENV_MODE = "COCOA_PROGRESS"
ENV_INTERVAL = "COCOA_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 10.0


def quiet_libraries() -> None:
    """Silence the progress bars of transformers, huggingface_hub and datasets (their official switches).

    The environment variables reach libraries imported later and child processes (DataLoader workers,
    torchrun ranks, subprocesses); the function calls reach modules already imported. An explicit
    ``HF_HUB_DISABLE_PROGRESS_BARS=0`` set by the user is left alone."""
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").strip() in ("0", "false", "False"):
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # huggingface_hub, and transformers (read at import)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "huggingface_hub" in sys.modules:
        try:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        except ImportError:  # pragma: no cover - very old hub
            pass
    if "transformers" in sys.modules:
        try:
            from transformers.utils import logging as tlog

            tlog.disable_progress_bar()
        except ImportError:  # pragma: no cover
            pass
    if "datasets" in sys.modules:
        try:
            import datasets

            datasets.disable_progress_bars()
        except (ImportError, AttributeError):  # pragma: no cover
            pass


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def mode(console: Any = None) -> str:
    """``rich``, ``plain`` or ``off``: ``$COCOA_PROGRESS`` if set, else ``rich`` only on an interactive terminal
    (stdout and stderr both TTYs, the console's own file too, and ``TERM`` is not ``dumb``)."""
    env = os.environ.get(ENV_MODE, "").strip().lower()
    if env in ("rich", "plain", "off"):
        return env
    if os.environ.get("TERM") == "dumb":
        return "plain"
    streams = [sys.stdout, sys.stderr]
    if console is not None and getattr(console, "file", None) is not None:
        streams.append(console.file)
    return "rich" if all(_isatty(s) for s in streams) else "plain"


def Progress(*columns: Any, console: Any = None, disable: bool = False, unit: str = "", interval: float | None = None,
             **kwargs: Any) -> Any:  # noqa: N802 - a drop-in for rich.progress.Progress
    """A rich ``Progress`` on a terminal, a :class:`PlainProgress` elsewhere (same methods cocoa uses)."""
    m = mode(console)
    if m == "rich":
        from rich.progress import Progress as RichProgress

        return RichProgress(*columns, console=console, disable=disable, **kwargs)
    return PlainProgress(console=console, disable=disable or m == "off", unit=unit, interval=interval)


def _hms(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(max(0.0, seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _plain(text: str) -> str:
    """``text`` without rich markup (``[bold]...[/bold]``)."""
    if "[" not in text:
        return text
    try:
        from rich.text import Text

        return Text.from_markup(text).plain
    except Exception:  # a literal bracket that is not markup
        return text


def _field(key: str, v: Any) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, bool):
        return f"{key} {v}"
    if isinstance(v, float):
        if v != v:  # nan: nothing measured yet
            return ""
        return f"{key} {v:.4g}"
    if isinstance(v, int):
        return f"{key} {v:,}"
    return _plain(str(v))


@dataclass
class PlainTask:
    """The attributes of ``rich.progress.Task`` that cocoa reads."""

    id: int
    description: str
    total: float | None
    completed: float = 0.0
    fields: dict[str, Any] = field(default_factory=dict)
    start_time: float = field(default_factory=time.monotonic)
    start_completed: float = 0.0
    last_print: float = field(default_factory=time.monotonic)
    printed_final: bool = False
    visible: bool = True

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start_time

    @property
    def speed(self) -> float | None:
        dt = self.elapsed
        done = self.completed - self.start_completed
        return done / dt if dt > 0 and done > 0 else None

    finished_speed = speed

    @property
    def finished(self) -> bool:
        return self.total is not None and self.completed >= self.total

    @property
    def remaining(self) -> float | None:
        return None if self.total is None else max(0.0, self.total - self.completed)

    @property
    def time_remaining(self) -> float | None:
        sp = self.speed
        return None if (sp is None or self.total is None) else self.remaining / sp  # type: ignore[operator]


class PlainProgress:
    """Plain periodic progress lines (no cursor movement, no truncation) with rate, elapsed time and ETA."""

    def __init__(self, console: Any = None, disable: bool = False, unit: str = "", interval: float | None = None) -> None:
        self.console = console
        self.disable = disable
        self.unit = unit
        if interval is None:
            try:
                interval = float(os.environ.get(ENV_INTERVAL, DEFAULT_INTERVAL))
            except ValueError:
                interval = DEFAULT_INTERVAL
        self.interval = interval
        self.tasks: list[PlainTask] = []
        self.live = False

    # -- context ---------------------------------------------------------------------------------
    def __enter__(self) -> "PlainProgress":
        self.start()
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.stop(final=exc_type is None)

    def start(self) -> None:
        self.live = True

    def stop(self, final: bool = True) -> None:
        if self.live and final:
            for t in self.tasks:
                if t.visible and not t.printed_final and t.completed > t.start_completed:
                    self._emit(t)
        self.live = False

    # -- rich-compatible task API ----------------------------------------------------------------
    def add_task(self, description: str, start: bool = True, total: float | None = 100.0, completed: float = 0,
                 visible: bool = True, **fields: Any) -> int:
        t = PlainTask(id=len(self.tasks), description=_plain(str(description)), total=total, completed=completed,
                      fields=dict(fields), start_completed=completed, visible=visible)
        self.tasks.append(t)
        return t.id

    def update(self, task_id: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, visible: bool | None = None,
               refresh: bool = False, **fields: Any) -> None:
        t = self.tasks[task_id]
        if total is not None:
            t.total = total
        if completed is not None:
            t.completed = completed
        if advance is not None:
            t.completed += advance
        if description is not None:
            t.description = _plain(str(description))
        if visible is not None:
            t.visible = visible
        t.fields.update(fields)
        self._maybe_emit(t)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def remove_task(self, task_id: int) -> None:
        self.tasks[task_id].visible = False

    def refresh(self) -> None:
        pass

    def print(self, *objects: Any, **kw: Any) -> None:
        if self.console is not None:
            self.console.print(*objects, **kw)
        else:
            print(*objects, file=sys.stderr, flush=True)

    # -- output ----------------------------------------------------------------------------------
    def _maybe_emit(self, t: PlainTask) -> None:
        if self.disable or not t.visible:
            return
        now = time.monotonic()
        if t.finished and not t.printed_final:
            self._emit(t)
            t.printed_final = True
        elif now - t.last_print >= self.interval and not t.finished:
            self._emit(t)

    def line(self, t: PlainTask) -> str:
        """One progress line for ``t``."""
        total = "?" if t.total is None else f"{int(t.total):,}"
        pct = f" ({t.completed / t.total:.0%})" if t.total else ""
        fields = " ".join(x for x in (_field(k, v) for k, v in t.fields.items()) if x)
        sp = t.speed
        unit = f" {self.unit}/s" if self.unit else "/s"
        rate = "?" + unit if sp is None else (f"{sp:.2f}" if sp < 10 else f"{sp:,.0f}") + unit
        eta = "0:00:00" if t.finished else _hms(t.time_remaining)
        head = f"{t.description}: " if t.description else ""
        return (f"{head}{int(t.completed):,}/{total}{pct}" + (f" {fields}" if fields else "")
                + f" | {rate}, elapsed {_hms(t.elapsed)}, ETA {eta}")

    def _emit(self, t: PlainTask) -> None:
        if self.disable:
            return
        t.last_print = time.monotonic()
        text = self.line(t)
        f = getattr(self.console, "file", None) or sys.stderr
        try:
            f.write(text + "\n")
            f.flush()
        except (OSError, ValueError):  # a closed pipe must not stop the work
            pass


def columns(unit: str = "it", fields: tuple[str, ...] = ()) -> tuple[Any, ...]:
    """cocoa's standard rich columns: description, bar, done/total, percent, rate in ``unit``/s, the
    task's named ``fields`` (e.g. ``loss``), elapsed, ETA. Used for every bar, so they all read the same."""
    from rich.progress import (BarColumn, MofNCompleteColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    class _Rate(TextColumn):
        def __init__(self) -> None:
            super().__init__("")

        def render(self, task):  # type: ignore[no-untyped-def]
            from rich.text import Text

            speed = task.finished_speed or task.speed
            text = "?" if speed is None else (f"{speed:.2f}" if speed < 10 else f"{speed:,.0f}")
            return Text(f"{text} {unit}/s", style="progress.data.speed")

    # a field is a name (shown as "name value") or a rich format string ("loss {task.fields[loss]:.3f}")
    extra = tuple(TextColumn(f if "{" in f else f"{f} {{task.fields[{f}]}}") for f in fields)
    return (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TaskProgressColumn(), _Rate(), *extra, TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())


def bar(*, unit: str = "it", fields: tuple[str, ...] = (), console: Any = None, disable: bool = False,
        **kwargs: Any) -> Any:
    """A :func:`Progress` with cocoa's standard :func:`columns` (rich on a terminal, plain lines elsewhere,
    nothing with ``disable``). Add tasks with ``add_task(description, total=..., **fields)``."""
    m = mode(console)
    cols = columns(unit, fields) if m == "rich" else ()
    return Progress(*cols, console=console, disable=disable, unit=unit, **kwargs)


class counting:
    """``with counting(total, "encoding", unit="inputs") as advance: advance(n)`` -- one task on a :func:`bar`."""

    def __init__(self, total: int, description: str = "", *, unit: str = "it", console: Any = None,
                 disable: bool = False) -> None:
        self._p = bar(unit=unit, console=console, disable=disable, transient=False)
        self.total, self.description = total, description

    def __enter__(self) -> Any:
        self._p.__enter__()
        self._task = self._p.add_task(self.description, total=self.total)
        return lambda k=1: self._p.advance(self._task, k)

    def __exit__(self, *exc: Any) -> None:
        self._p.__exit__(*exc)


__all__ = ["Progress", "PlainProgress", "PlainTask", "quiet_libraries", "mode", "columns", "bar", "counting",
           "ENV_MODE", "ENV_INTERVAL"]
