"""What reading a PDF costs next to the model: the input layer's share of a `summarize` ingest.

Builds an N-page PDF from the bundled novel (~500 tokens a page, written by bench/fixtures.py's dependency-free
writer), then measures on the same machine, one after the other:

1. the input path alone — pypdf page by page, markers, UTF-8 accounting, tokenization, the source map — exactly
   what `summarize` runs before the model (cascadectl.inputs.iter_segments -> engine.retention_report
   .iter_mapped_token_ids), with no model;
2. optionally (`--engine-tokens N`) the engine's strided prefill on the first N of those tokens, as
   bench/ingest.py does, for the engine's tokens/s on this machine;
3. optionally (`--summarize`) the whole `cascadectl summarize` run on the PDF, in-process, timed by its own stats.

    python bench/input_overhead.py --pages 300 --engine-tokens 16384

Overhead = input seconds per token / engine seconds per token (the input layer runs in the same thread as the model,
so its time adds to the ingest). Prints one JSON row with command, machine and versions."""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # python bench/x.py: bench/checkout.py puts this checkout on sys.path
    import checkout  # noqa: F401

from bench.common import peak_rss_mib, provenance  # noqa: E402
from cascadectl.inputs import InputReport, iter_segments  # noqa: E402
from engine.config import CacheConfig  # noqa: E402
from engine.models import load_model  # noqa: E402
from engine.retention_report import SourceMap, iter_mapped_token_ids  # noqa: E402
from engine.runner import Runner  # noqa: E402
from bench.fixtures import write_pdf  # noqa: E402

LINES_PER_PAGE = 40


def book_pages(n_pages: int) -> list[str]:
    text = (ROOT / "data" / "pride_and_prejudice.txt").read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    pages, i = [], 0
    while len(pages) < n_pages:
        chunk = [lines[(i + k) % len(lines)] for k in range(LINES_PER_PAGE)]
        pages.append("\n".join(chunk))
        i += LINES_PER_PAGE
    return pages


def time_input(pdf: Path, tokenizer) -> tuple[list[int], float, InputReport]:
    report, source_map = InputReport(), SourceMap()
    ids: list[int] = []
    start = time.perf_counter()
    for piece in iter_mapped_token_ids(tokenizer, iter_segments([str(pdf)], report=report), source_map):
        ids.extend(piece)
    return ids, time.perf_counter() - start, report


def time_engine(lm, ids: list[int], config: CacheConfig) -> float:
    x = torch.tensor([ids])
    with Runner(lm.model, config) as runner:
        start = time.perf_counter()
        for i in range(0, len(ids), config.stride):
            runner.step(x[:, i : i + config.stride])
        return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=300)
    ap.add_argument("--engine-tokens", type=int, default=0, help="also time the prefill on this many tokens")
    ap.add_argument("--summarize", action="store_true", help="also run the whole summarize command on the PDF")
    ap.add_argument("--cache-size", type=int, default=4096)
    ap.add_argument("--stride", type=int, default=1024)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    lm = load_model(None, "cpu", "bf16")
    row = provenance() | {"pages": args.pages}
    with tempfile.TemporaryDirectory() as tmp:
        pdf = write_pdf(Path(tmp) / "book.pdf", book_pages(args.pages))
        row["pdf_bytes"] = pdf.stat().st_size
        ids, seconds, report = time_input(pdf, lm.tokenizer)
        row |= {"tokens": len(ids), "pages_read": report.pages_read, "input_seconds": round(seconds, 2),
                "input_tokens_per_s": round(len(ids) / seconds, 1)}
        if args.engine_tokens:
            n = min(args.engine_tokens, len(ids))
            config = CacheConfig(cache_size=args.cache_size, stride=args.stride)
            engine_s = time_engine(lm, ids[:n], config)
            row |= {"engine_tokens": n, "engine_seconds": round(engine_s, 2),
                    "engine_tokens_per_s": round(n / engine_s, 1),
                    "input_overhead": round((seconds / len(ids)) / (engine_s / n), 4)}
        if args.summarize:
            from typer.testing import CliRunner

            from cascadectl.main import app

            result = CliRunner().invoke(app, ["summarize", str(pdf), "--cache-size", str(args.cache_size),
                                              "--stride", str(args.stride), "--max-tokens", "64", "--json"])
            doc = json.loads(result.stdout)
            row |= {"summarize_tokens": doc["stats"]["tokens"],
                    "summarize_ingest_seconds": round(doc["stats"]["seconds_ingest"], 2),
                    "summarize_tokens_per_s": round(doc["stats"]["tokens_per_s"], 1),
                    "summarize_peak_rss_mib": round(doc["stats"]["peak_rss_bytes"] / 2**20, 1)}
    row["peak_rss_mib"] = round(peak_rss_mib(), 1)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
