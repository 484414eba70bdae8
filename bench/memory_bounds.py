"""Peak memory does not grow with the input: `ppl` over 64K vs 1M tokens, `summarize` over a 100- vs 1,000-page PDF.

Each run is a fresh `python -m cascadectl ... --json` process reading generated input through the real CLI path
(input layer, tokenizer, strided prefill, cache) with a small random-weight llama loaded by `--model DIR` (the
fast path: the numbers are about memory, not about the model), and its peak RSS is the process's own
`getrusage` maximum, from the JSON it prints. The text is random words from the tokenizer's vocabulary, one token
each, so N words are N tokens.

    python bench/memory_bounds.py                       # 64K and 1M tokens; 100 and 1,000 pages
    python bench/memory_bounds.py --tokens 65536,262144 --pages 10,100 --out results.jsonl

Prints a table on stderr and one JSON object per run (with command, machine and versions) on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # python bench/x.py: bench/checkout.py puts this checkout on sys.path
    import checkout  # noqa: F401

from bench.common import provenance  # noqa: E402
from bench.fixtures import write_pdf, write_tiny_model  # noqa: E402

MiB = 1 << 20
WORDS = [f"w{i:04d}" for i in range(2000)]
CACHE = ["--cache-size", "1024", "--stride", "512", "--sinks", "4", "--cascades", "4"]


def write_words(path: Path, n_words: int, seed: int = 0) -> Path:
    """`n_words` random vocabulary words, 16 to a line, written in chunks (never all in memory)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, n_words, 16 * 1024):
            lines = []
            for line_start in range(start, min(start + 16 * 1024, n_words), 16):
                lines.append(" ".join(rng.choices(WORDS, k=min(16, n_words - line_start))))
            f.write("\n".join(lines) + "\n")
    return path


def write_book_pdf(path: Path, pages: int, lines_per_page: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    texts = ["\n".join(" ".join(rng.choices(WORDS, k=10)) for _ in range(lines_per_page)) for _ in range(pages)]
    return write_pdf(path, texts)


def run(args: list[str]) -> dict:
    """One CLI process; its JSON document plus the wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cascadectl", *args, "--json"], capture_output=True, text=True,
                          env=env)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): cascadectl {' '.join(args)}\n{proc.stderr[-2000:]}")
    doc = json.loads(proc.stdout)
    doc["wall_s"] = time.perf_counter() - start
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="65536,1048576", help="ppl input sizes in tokens; the first is the baseline")
    ap.add_argument("--pages", default="100,1000", help="summarize PDF sizes in pages; the first is the baseline")
    ap.add_argument("--out", help="also append the JSON lines to this file")
    opts = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = write_tiny_model(tmp / "model", words=WORDS, layers=2, hidden=64)
        for n in [int(x) for x in opts.tokens.split(",") if x]:
            path = write_words(tmp / f"words-{n}.txt", n)
            doc = run(["ppl", str(path), "--model", str(model), *CACHE])
            path.unlink()
            result = doc["results"][0]
            rows.append({"bench": "memory_bounds", "cli": "ppl", "input": f"{n:,} tokens",
                         "tokens": result["tokens"], "peak_rss_bytes": doc["peak_rss_bytes"],
                         "tokens_per_s": result["tokens_per_s"], "wall_s": doc["wall_s"]})
        for pages in [int(x) for x in opts.pages.split(",") if x]:
            path = write_book_pdf(tmp / f"book-{pages}.pdf", pages)
            doc = run(["summarize", str(path), "--model", str(model), *CACHE, "--max-tokens", "8"])
            stats = doc["stats"]
            rows.append({"bench": "memory_bounds", "cli": "summarize", "input": f"{pages:,}-page PDF",
                         "tokens": stats["tokens"], "pages": doc["record"]["input"]["pages"],
                         "pdf_bytes": path.stat().st_size, "peak_rss_bytes": stats["peak_rss_bytes"],
                         "tokens_per_s": stats["tokens_per_s"], "wall_s": doc["wall_s"]})
    env = provenance() | {"model": "random llama, 2 layers, hidden 64, 2,003-word vocabulary (--model DIR)",
                          "settings": " ".join(CACHE), "omp_threads": os.environ.get("OMP_NUM_THREADS", "1")}
    for command in ("ppl", "summarize"):
        group = [r for r in rows if r["cli"] == command]
        for r in group:
            r["ratio_to_baseline"] = r["peak_rss_bytes"] / group[0]["peak_rss_bytes"]
    print(f"{'command':10} {'input':>18} {'tokens':>10} {'peak RSS':>10} {'vs first':>9} {'tok/s':>8}",
          file=sys.stderr)
    for r in rows:
        print(f"{r['cli']:10} {r['input']:>18} {r['tokens']:>10,} {r['peak_rss_bytes'] / MiB:>6.1f} MiB "
              f"{r['ratio_to_baseline']:>8.3f}x {r['tokens_per_s']:>8,.0f}", file=sys.stderr)
    lines = [json.dumps(r | env) for r in rows]
    print("\n".join(lines))
    if opts.out:
        with open(opts.out, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
