"""What a `summarize` or `ask` run reports besides its answer: the stats line (and --json `stats`), and the
retention report's tables on stderr (--report)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from rich.table import Table

from .common import peak_rss_bytes
from .console import console, human_bytes


@dataclass
class Stats:
    tokens: int = 0  # input tokens read
    seconds_ingest: float = 0.0
    generated_tokens: int = 0
    seconds_generate: float = 0.0
    kv_cache_bytes: int = 0
    loaded_from: str | None = None  # the --load-cache file the input's cache came from
    # on CUDA: decode steps run eagerly, captured and replayed as a CUDA graph, and why no graph served (`off`)
    decode_graph: dict | None = None
    # several questions decoded together from the frozen cache (engine/batch_answer.py): questions, document
    # tokens they all see, decode steps (each one token of every question), bytes of the frozen copy and the tails
    answer_batch: dict | None = None

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "tokens_per_s": self.tokens / self.seconds_ingest if self.seconds_ingest else 0.0,
            "decode_tokens_per_s": self.generated_tokens / self.seconds_generate if self.seconds_generate else 0.0,
            "peak_rss_bytes": peak_rss_bytes(),
        }

    def line(self) -> str:
        d = self.as_dict()
        read = (f"loaded {self.tokens:,} input tokens from {self.loaded_from} in {self.seconds_ingest:.1f} s"
                if self.loaded_from else
                f"read {self.tokens:,} tokens in {self.seconds_ingest:.1f} s ({d['tokens_per_s']:,.0f} tok/s)")
        return (f"{read} · "
                f"wrote {self.generated_tokens} tokens in {self.seconds_generate:.1f} s "
                f"({d['decode_tokens_per_s']:.1f} tok/s) · peak memory {human_bytes(d['peak_rss_bytes'])} · "
                f"KV cache {human_bytes(self.kv_cache_bytes)}")


def print_report(retention: dict, max_rows: int = 20) -> None:
    """The retention report as tables on stderr (even with --quiet: it was asked for)."""
    n = retention["input_tokens"]
    guided = " (question-guided)" if retention.get("question_guided") else ""
    console.print(f"[bold]Retention{guided}[/]: {retention['kept_mean']:,.0f} of {n:,} input tokens cached per KV "
                  f"head on average ({retention['kept_layer0']:,.0f} at layer 0), beside "
                  f"{retention['pinned_prefix_tokens']} pinned prompt tokens")
    sections = [("tenth", retention["by_tenth"], lambda r: f"{r['tenth']}/10")]
    if len(retention["by_file"]) > 1:
        sections.append(("file", retention["by_file"], lambda r: r["source"]))
    if retention["by_page"]:
        sections.append(("page", retention["by_page"], lambda r: f"{r['source']} p.{r['page']}"))
    for title, rows, label in sections:
        table = Table(box=None, pad_edge=False)
        table.add_column(title, overflow="fold")
        for col in ("tokens", "kept (layer 0)", "kept (mean)", "share kept"):
            table.add_column(col, justify="right", no_wrap=True)
        table.add_column("", no_wrap=True)
        for r in rows[:max_rows]:
            table.add_row(label(r), f"{r['tokens']:,}", f"{r['kept_layer0']:,.0f}", f"{r['kept_mean']:,.0f}",
                          f"{100 * r['kept_fraction']:.1f}%", "█" * round(20 * r["kept_fraction"]))
        console.print(table)
        if len(rows) > max_rows:
            console.print(f"[dim]... {len(rows) - max_rows} more {title}s in --json[/]")
