"""Everything the CLI writes to stderr: messages, live progress, plain progress lines when not a terminal.

Every message is one physical line, however long: rich would otherwise wrap it at the terminal's width (80
columns when stderr is a file or a pipe), and a path cut in two cannot be found with grep."""
from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .flags import render

console = Console(stderr=True, highlight=False)


MAX_SKIP_LINES = 10  # skipped inputs listed one per line up to this many; past it, the first few and a count


class Say:
    """Messages to stderr, one line each (soft_wrap: never folded); `quiet` silences all but errors. Settings the
    engine names (`cache_size`) are shown as their flags (cascadectl/flags.py)."""

    quiet = False

    @classmethod
    def info(cls, msg: str) -> None:
        if not cls.quiet:
            console.print(render(msg), soft_wrap=True)

    @classmethod
    def warn(cls, msg: str) -> None:
        if not cls.quiet:
            console.print(f"[yellow]warning:[/] {escape(render(msg))}", soft_wrap=True)  # paths may hold [brackets]

    @staticmethod
    def error(msg: str) -> None:
        console.print(f"[red]error:[/] {escape(render(msg))}", soft_wrap=True)

    @classmethod
    def skipped(cls, entries: list[tuple[str, str]], limit: int = MAX_SKIP_LINES) -> None:
        """Warn about the inputs a folder walk did not read, one line each with its reason ('skipped PATH:
        binary'); past `limit` the first few and '... and N more'. Hidden entries are left out: skipping them is
        the documented rule, not a problem. All of them are in --json."""
        shown = [(path, reason) for path, reason in entries if reason != "hidden"]
        few = shown if len(shown) <= limit else shown[: limit // 2]
        for path, reason in few:
            cls.warn(f"skipped {path}: {reason}")
        if len(few) < len(shown):
            cls.warn(f"... and {len(shown) - len(few):,} more skipped (see --json)")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def fill_text(fill: list[tuple[int, int]], evidence: tuple[int, int] | None = None) -> str:
    """'sinks 64/64 | 1024/1024 1024/1024 512/1024 0/1024' from the cache's (used, capacity) pairs, and
    ' | evidence 96/512' when an evidence store holds spans."""
    sinks, rest = fill[0], fill[1:]
    if not rest:  # the dense cache has no sub-caches
        return f"{sinks[0]:,} tokens cached"
    text = f"sinks {sinks[0]}/{sinks[1]} | " + " ".join(f"{u}/{c}" for u, c in rest)
    return text + (f" | evidence {evidence[0]}/{evidence[1]}" if evidence else "")


class TokenProgress:
    """Tokens done / estimated total, tok/s, ETA and cache fill; a few plain lines when stderr is not a tty."""

    def __init__(self, phase: str, total: int | None, quiet: bool = False):
        self.phase, self.total, self.quiet = phase, total, quiet
        self.live = console.is_terminal and not quiet
        self._start = time.perf_counter()
        self._last_plain = 0.0
        self._progress: Progress | None = None

    def __enter__(self) -> "TokenProgress":
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed:,.0f}/{task.total:,.0f} tok"),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("[dim]{task.fields[extra]}"),
                console=console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.phase, total=self.total or 1, rate="", extra="")
        return self

    def update(self, done: int, total: int | None = None, extra: str = "") -> None:
        if total:
            self.total = max(total, done)
        elapsed = time.perf_counter() - self._start
        rate = done / elapsed if elapsed > 0 else 0.0
        if self._progress is not None:
            self._progress.update(self._task, completed=done, total=self.total or done or 1,
                                  rate=f"{rate:,.0f} tok/s", extra=extra)
        elif not self.quiet and elapsed - self._last_plain >= 30:
            self._last_plain = elapsed
            total_txt = f"/~{self.total:,}" if self.total else ""
            console.print(f"{escape(self.phase)}: {done:,}{total_txt} tokens, {rate:,.0f} tok/s {extra}".rstrip(),
                          soft_wrap=True)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
