"""What `summarize` and `ask` share: read the input once with progress, stream answers, print stats and reports.

A `Session` owns the runner for one input: `read()` streams the pinned prefix and the input through the cache
(progress on stderr), `answer()` appends a closing request and streams the answer to stdout, `finish()` prints the
stats line, the retention report and/or the JSON document."""
from __future__ import annotations

import copy
import json
import sys
import time
from array import array
from dataclasses import asdict, dataclass
from typing import Annotated, Optional

import torch
import typer
from rich.table import Table

from engine.config import CacheConfig
from engine.prompt import Prompt
from engine.retention import QuestionGuide
from engine.retention_report import SourceMap, iter_mapped_token_ids, retention_report
from engine.runner import Runner
from engine.session import answer, check_room, ingest, stop_ids

from .common import peak_rss_bytes, versions
from .console import Say, TokenProgress, console, fill_text, human_bytes
from .inputs import InputReport, iter_segments, total_bytes_estimate

MaxTokens = Annotated[int, typer.Option("--max-tokens", "-t", rich_help_panel="Generation",
                                        help="Most tokens to generate per answer.")]
Temperature = Annotated[float, typer.Option("--temperature", rich_help_panel="Generation",
                                            help="0 = greedy; higher samples more freely.")]
Seed = Annotated[int, typer.Option("--seed", rich_help_panel="Generation", help="Sampling seed.")]
Report = Annotated[bool, typer.Option("--report", rich_help_panel="Output",
                                      help="Print on stderr how the cached tokens spread over the input.")]
Words = Annotated[Optional[int], typer.Option("--words", "-w", rich_help_panel="Generation", show_default=False,
                                              help="Target length of the answer in words.")]
Instruction = Annotated[Optional[str], typer.Option("--instruction", "-i", rich_help_panel="Generation",
                                                    show_default=False, help="Replace the request to the model.")]
MAX_TOKENS = 256


@dataclass
class Stats:
    tokens: int = 0  # input tokens read
    seconds_ingest: float = 0.0
    generated_tokens: int = 0
    seconds_generate: float = 0.0
    kv_cache_bytes: int = 0

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "tokens_per_s": self.tokens / self.seconds_ingest if self.seconds_ingest else 0.0,
            "decode_tokens_per_s": self.generated_tokens / self.seconds_generate if self.seconds_generate else 0.0,
            "peak_rss_bytes": peak_rss_bytes(),
        }

    def line(self) -> str:
        d = self.as_dict()
        return (f"read {self.tokens:,} tokens in {self.seconds_ingest:.1f} s ({d['tokens_per_s']:,.0f} tok/s) · "
                f"wrote {self.generated_tokens} tokens in {self.seconds_generate:.1f} s "
                f"({d['decode_tokens_per_s']:.1f} tok/s) · peak memory {human_bytes(d['peak_rss_bytes'])} · "
                f"KV cache {human_bytes(self.kv_cache_bytes)}")


class Session:
    """One input read once through one runner; answers come from that cache (or copies of it)."""

    def __init__(self, lm, config: CacheConfig, sources: list[str], prompt: Prompt, max_tokens: int,
                 quiet: bool = False, question_weight: float = 0.0):
        self.lm, self.config, self.sources, self.prompt, self.quiet = lm, config, sources, prompt, quiet
        self.max_tokens, self.question_weight = max_tokens, question_weight
        self.guided = prompt.question_span is not None and question_weight > 0 and config.policy == "cascade"
        self.input = InputReport()
        self.source_map = SourceMap()
        self.stats = Stats()
        self.retention: dict = {}
        self.n_sinks = max(config.sinks, len(prompt.prefix_ids))
        self.runner: Runner | None = None

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self.runner is not None:
            self.runner.close()
        if exc_type is KeyboardInterrupt:  # partial statistics, then handle_errors exits with 130
            Say.info(f"[dim]{self.stats.line()}[/]")

    def read(self, longest_suffix: int) -> None:
        """Check positions, then stream prefix and input through a fresh runner, with progress on stderr."""
        segments = iter_segments(self.sources, report=self.input)
        tokenized = [0]  # tokens the tokenizer produced so far: runs ahead of the model by up to a 64K piece

        def counted(pieces):
            for piece in pieces:
                tokenized[0] += len(piece)
                yield piece

        pieces = counted(iter_mapped_token_ids(self.lm.tokenizer, segments, self.source_map))
        n_prefix = len(self.prompt.prefix_ids)
        known = None
        if self.config.policy == "full":  # positions grow with the input: count it before any model work
            ids = array("l")
            for piece in pieces:
                ids.extend(piece)
            pieces, known = [ids.tolist()], len(ids)
        q_tokens = self.prompt.question_span[1] - self.prompt.question_span[0] if self.guided else 0
        warning = check_room(self.config, self.n_sinks, self.lm.max_positions, longest_suffix, self.max_tokens,
                             None if known is None else n_prefix + known, q_tokens)
        if warning:
            Say.warn(warning)
        expected = n_prefix + (known or 0) + longest_suffix + self.max_tokens if known is not None else 0
        self.runner = Runner(self.lm.model, self.config, n_sinks=self.n_sinks, expected_tokens=expected)
        total_bytes = total_bytes_estimate(self.sources)
        start = time.perf_counter()
        with TokenProgress("reading", known, self.quiet) as progress:

            def on_chunk(done: int) -> None:
                self.stats.tokens, self.stats.seconds_ingest = done, time.perf_counter() - start
                total = known or _estimate_total(tokenized[0], self.input.bytes_read, total_bytes)
                progress.update(done, total, fill_text(self.runner.cache.fill()))

            if self.guided:
                with QuestionGuide(self.runner, self.prompt.question_span, self.question_weight):
                    n_input = ingest(self.runner, self.prompt.prefix_ids, pieces, on_chunk)
            else:
                n_input = ingest(self.runner, self.prompt.prefix_ids, pieces, on_chunk)
        self.stats.tokens, self.stats.seconds_ingest = n_input, time.perf_counter() - start
        self.stats.kv_cache_bytes = self.runner.cache.nbytes()
        self.retention = {
            "question_guided": self.guided,
            "question_weight": self.question_weight if self.guided else 0.0,
            **retention_report(self.runner.cache, n_prefix, n_input, self.source_map),
        }

    def answer(self, suffix_ids: list[int], temperature: float, seed: int, echo: bool, fork: bool = False) -> str:
        """Stream one answer (to stdout when `echo`); `fork` answers from a copy of the cache, kept for the next."""
        runner = self.runner
        base = runner.cache
        if fork:
            with torch.inference_mode():
                runner.cache = copy.deepcopy(base)
        text = []
        seconds_before, start = self.stats.seconds_generate, time.perf_counter()

        def on_token(_: int) -> None:
            self.stats.generated_tokens += 1
        try:
            for piece in answer(runner, self.lm.tokenizer, suffix_ids, self.max_tokens, temperature, seed,
                                stop_ids(self.lm.tokenizer), on_token):
                text.append(piece)
                if echo:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        finally:
            self.stats.seconds_generate = time.perf_counter() - start + seconds_before
            if echo:
                sys.stdout.write("\n")
                sys.stdout.flush()
            runner.cache = base
        return "".join(text)

    def record(self, generation: dict) -> dict:
        """Everything needed to reproduce the run."""
        return {
            "model_id": self.lm.model_id,
            "model_hash": self.lm.model_hash,
            "dtype": str(self.lm.dtype).removeprefix("torch."),
            "device": str(self.lm.device),
            "settings": asdict(self.config) | {"effective_sinks": self.n_sinks},
            "generation": generation,
            "input_sha256": self.input.text_sha256,
            "input": {"sources": self.sources, "files": len(self.input.files_read), "pages": self.input.pages_read,
                      "replaced_bytes": self.input.replaced_bytes, "skipped": self.input.skipped},
            "versions": versions(),
        }

    def finish(self, doc: dict, generation: dict, as_json: bool, show_report: bool) -> None:
        """Stats line and report on stderr, or the JSON document on stdout."""
        if as_json:
            doc = {**doc, "stats": self.stats.as_dict(), "retention": self.retention,
                   "record": self.record(generation)}
            sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
            sys.stdout.flush()
        if show_report and self.retention:
            print_report(self.retention)
        Say.info(f"[dim]{self.stats.line()}[/]")


def _estimate_total(tokenized: int, bytes_read: int, total_bytes: int) -> int | None:
    """Tokens expected overall, from the tokens the bytes read so far gave (unknown for stdin)."""
    if not total_bytes or not bytes_read:
        return None
    return int(tokenized * max(total_bytes, bytes_read) / bytes_read)


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
