"""The CLI's one ingest loop: every command that reads an input through a cache (ppl, summarize, ask, and their
--each runs) tokenizes it with `InputTokens` and drives one of the engine's per-chunk generators
(engine.reading.ingest_steps, engine.perplexity.perplexity_steps) with `drive`:

    tokens = InputTokens(lm.tokenizer, sources)                       # segments -> counted token pieces
    pieces, known = tokens.pieces, None
    if config.policy == "full":                                       # positions grow with the input
        ids = read_all(pieces); pieces, known = [ids], len(ids)      # count it before any model work
    done = drive(ingest_steps(runner, prefix_ids, pieces), "reading", quiet, known, tokens.estimate_total,
                 fill=lambda: fill_text(runner.cache.fill()), ckpt=ckpt, save=save, partial=...)

Between two chunks, where the cache is whole, `drive` updates the progress line, writes a checkpoint when one is
due or Ctrl-C was pressed, and stops there on Ctrl-C (ChunkInterrupts: a second Ctrl-C stops at once)."""
from __future__ import annotations

from array import array
from typing import Callable, Iterable, Iterator

from engine.checkpoint import Checkpoint
from engine.retention_report import SourceMap, iter_mapped_token_ids
from engine.tokens import iter_token_ids

from .common import ChunkInterrupts
from .console import Say, TokenProgress, human_bytes
from .inputs import InputReport, iter_segments, total_bytes_estimate


class InputTokens:
    """The token pieces of `sources`, counted as the tokenizer produces them (it runs ahead of the model by up to
    a 64K piece), with the one estimate of the total that progress shows.

    With `source_map`, each file and page is tokenized on its own and mapped (engine.retention_report: what
    `summarize` and `ask` report and cite); without, the text streams through one tokenizer run (`ppl`)."""

    def __init__(self, tokenizer, sources: list[str], report: InputReport | None = None,
                 source_map: SourceMap | None = None):
        self.report = report if report is not None else InputReport()
        self.total_bytes = total_bytes_estimate(sources)
        self.tokenized = 0  # tokens the tokenizer produced so far
        self.text_bytes = 0  # UTF-8 bytes of the text segments read so far, file and page headers included
        segments = self._counted_segments(iter_segments(sources, report=self.report))
        pieces = (iter_token_ids(tokenizer, (s.text for s in segments)) if source_map is None
                  else iter_mapped_token_ids(tokenizer, segments, source_map))
        self.pieces: Iterator[list[int]] = self._counted(pieces)

    def _counted_segments(self, segments):
        for segment in segments:
            self.text_bytes += len(segment.text.encode("utf-8", "replace"))
            yield segment

    def _counted(self, pieces: Iterable[list[int]]) -> Iterator[list[int]]:
        for piece in pieces:
            self.tokenized += len(piece)
            yield piece

    def estimate_total(self, done: int = 0) -> int | None:
        """Tokens expected overall, from the tokens the bytes read so far gave (unknown for stdin)."""
        bytes_read = self.report.bytes_read
        if not self.total_bytes or not bytes_read:
            return None
        return int(max(self.tokenized, done) * max(self.total_bytes, bytes_read) / bytes_read)


def read_all(pieces: Iterable[list[int]]) -> list[int]:
    """Every id of `pieces` in one list (held compactly while it is read)."""
    ids = array("l")
    for piece in pieces:
        ids.extend(piece)
    return ids.tolist()


def drive(steps: Iterable[int], label: str, quiet: bool, known: int | None = None,
          estimate: Callable[[int], int | None] | None = None, fill: Callable[[], str] = str,
          ckpt: Checkpoint | None = None, save: Callable[[], int] | None = None,
          partial: Callable[[int], str] | None = None, on_step: Callable[[int], None] | None = None) -> int:
    """Run `steps` (an engine generator yielding the tokens done after each chunk) to its end; returns the last
    count (0 when there was no chunk).

    After each chunk: `on_step(done)`, then progress (`known` total, else `estimate(done)`; `fill()` for the
    cache's state), then a checkpoint through `save()` when `ckpt` is due or Ctrl-C was pressed; on Ctrl-C,
    `partial(done)` on stderr and KeyboardInterrupt (exit 130)."""
    done = 0
    with TokenProgress(label, known, quiet) as progress, ChunkInterrupts() as stop:
        for done in steps:
            if on_step is not None:
                on_step(done)
            progress.update(done, known or (estimate(done) if estimate is not None else None), fill())
            if ckpt is not None and (stop.requested or ckpt.due(done)):
                size = save()
                Say.info(f"[dim]checkpoint: {done:,} input tokens saved to {ckpt.path} ({human_bytes(size)})[/]")
            if stop.requested:
                Say.info(partial(done) if partial is not None else f"interrupted after {done:,} tokens")
                if ckpt is not None:
                    Say.info(f"resume with the same command and --resume (checkpoint {ckpt.path})")
                raise KeyboardInterrupt
    return done
