"""Where the tokens still cached after reading came from: by file, by page and by tenth of the input.

While the input is tokenized, `iter_mapped_token_ids` records in a `SourceMap` the input-token offset at which
each (source, page) run starts: a handful of boundaries, never one entry per token. After ingest,
`retention_report` reads `cache.token_index(layer)` (original stream index of every visible token, per KV
head) and counts, per bucket, how many input tokens are still cached: at layer 0 and averaged over all layers.
Counts are per KV head (each head keeps its own tokens), averaged over heads."""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import groupby
from typing import Iterable, Iterator

import torch

from .cache.base import KVCache
from .tokens import iter_token_ids


@dataclass
class SourceMap:
    """Boundaries (first input token, source, page) in stream order; page is None outside PDFs."""

    starts: list[int] = field(default_factory=list)
    labels: list[tuple[str, int | None]] = field(default_factory=list)

    def add(self, start: int, source: str, page: int | None) -> None:
        label = (source, page)
        if self.labels and self.labels[-1] == label:
            return
        if self.starts and self.starts[-1] == start:  # the previous run gave no tokens
            self.labels[-1] = label
            if len(self.labels) > 1 and self.labels[-2] == label:
                self.starts.pop()
                self.labels.pop()
            return
        self.starts.append(start)
        self.labels.append(label)


def iter_mapped_token_ids(tokenizer, segments: Iterable, source_map: SourceMap) -> Iterator[list[int]]:
    """`tokens.iter_token_ids` over segments (objects with .text, .source, .page), filling `source_map`.

    Each run of segments with the same (source, page) is tokenized on its own: runs start at a file or page
    header, where a tokenizer call boundary costs nothing."""
    done = 0
    for (source, page), run in groupby(segments, key=lambda s: (s.source, s.page)):
        source_map.add(done, source, page)
        for ids in iter_token_ids(tokenizer, (s.text for s in run)):
            done += len(ids)
            yield ids


def _kept(index: torch.Tensor, n_prefix: int, n_input: int, starts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-bucket counts of cached input tokens for index [Hkv, P]: (per run of the map, per tenth), head-averaged."""
    pos = index - n_prefix
    pos = pos[(pos >= 0) & (pos < n_input)]  # the pinned prefix and the request are not input
    n_heads = index.shape[0]
    run = torch.searchsorted(starts, pos, right=True) - 1
    by_run = torch.bincount(run, minlength=starts.numel()).double() / n_heads
    by_tenth = torch.bincount(pos * 10 // n_input, minlength=10).double() / n_heads
    return by_run, by_tenth


def retention_report(cache: KVCache, n_prefix: int, n_input: int, source_map: SourceMap) -> dict:
    """JSON-ready spread of the cached input tokens; `n_prefix` = stream index of the first input token."""
    n_layers = cache.shape.n_layers
    starts_list = source_map.starts or [0]
    labels = source_map.labels or [("<input>", None)]
    starts = torch.tensor(starts_list, dtype=torch.long)
    runs, tenths = [], []
    for layer in range(n_layers):
        index = cache.token_index(layer)[0].cpu()  # batch row 0: [Hkv, P]
        by_run, by_tenth = _kept(index, n_prefix, max(n_input, 1), starts)
        runs.append(by_run)
        tenths.append(by_tenth)
    run0, run_mean = runs[0], torch.stack(runs).mean(0)
    tenth0, tenth_mean = tenths[0], torch.stack(tenths).mean(0)
    run_tokens = [b - a for a, b in zip(starts_list, starts_list[1:] + [n_input])]

    def row(tokens: int, kept0: float, kept: float, **key) -> dict:
        return {**key, "tokens": tokens, "kept_layer0": round(kept0, 2), "kept_mean": round(kept, 2),
                "kept_fraction": round(kept / tokens, 4) if tokens else 0.0}

    files: dict[str, list[float]] = {}
    pages = []
    for (source, page), tokens, k0, km in zip(labels, run_tokens, run0.tolist(), run_mean.tolist()):
        acc = files.setdefault(source, [0, 0.0, 0.0])
        acc[0] += tokens
        acc[1] += k0
        acc[2] += km
        if page is not None:
            pages.append(row(tokens, k0, km, source=source, page=page))
    tenth_rows = []
    for i in range(10):
        first, last = -(-i * n_input // 10), -(-(i + 1) * n_input // 10)  # token t is in tenth t·10 // n
        tenth_rows.append(row(last - first, tenth0[i].item(), tenth_mean[i].item(), tenth=i + 1,
                              first_token=first))
    return {
        "input_tokens": n_input,
        "pinned_prefix_tokens": n_prefix,
        "kept_layer0": round(run0.sum().item(), 2),  # input tokens cached per KV head at layer 0
        "kept_mean": round(run_mean.sum().item(), 2),  # the same, averaged over layers
        "by_file": [row(t, k0, km, source=s) for s, (t, k0, km) in files.items()],
        "by_page": pages,
        "by_tenth": tenth_rows,
    }
