"""Perplexity sweep over the bundled 200K-token books: sink vs cascade at several cache sizes and settings.

One process loads the model once and runs its share of the plan (`--shard i --shards n` takes rows i, i+n, ...),
in priority order, writing one JSON row per finished run, so a run stopped by `--deadline` still leaves every
finished row. On a GPU machine start one process per card (CUDA_VISIBLE_DEVICES) with the same `--shards`.

    python bench/quality_sweep.py --device cuda --shard 0 --shards 2 --deadline 300 --out ppl_sweep.jsonl

Rows: book, tokens, policy, cache, cascades, beta, head_reduce, stride, sinks, ppl, ppl_err, nll_mean, seconds,
tok_s, plus the provenance (command, machine, GPU, versions, git revision) in every row.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

if not __package__:  # python bench/x.py: bench/checkout.py puts this checkout on sys.path
    import checkout  # noqa: F401

from bench.common import provenance  # noqa: E402
from engine.config import CacheConfig  # noqa: E402
from engine.models import load_model  # noqa: E402
from engine.perplexity import perplexity  # noqa: E402
from engine.runner import Runner  # noqa: E402
from engine.tokens import rechunk  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data")
BOOKS = {"pride_and_prejudice": "pride_and_prejudice.txt", "kjv_pentateuch": "kjv_pentateuch.txt"}


def plan() -> list[dict]:
    """Every run, most wanted first: per cache size the window and 2/4/8 cascades, then one change at a time."""
    caches = ((512, 256), (2048, 512), (1024, 256), (4096, 1024))
    main = [dict(policy="sink"), dict(cascades=4), dict(cascades=8), dict(cascades=2)]
    extra = [dict(cascades=3), dict(cascades=4, beta=0.99), dict(cascades=4, beta=0.9999),
             dict(cascades=4, head_reduce="mean")]
    rows = []
    for variants in (main, extra):
        for cache, stride in caches:
            for change in variants:
                if cache % change.get("cascades", 1):
                    continue  # sub-caches must split the cache evenly (3 cascades: no power-of-two cache)
                for book in BOOKS:
                    rows.append(dict(book=book, cache_size=cache, stride=stride, **change))
    for stride, change in ((2048, dict(cascades=4)), (2048, dict(policy="sink")), (256, dict(cascades=4))):
        for book in BOOKS:  # the stride sweep at cache 4096 (4096 itself would pass the 8,192 positions)
            rows.append(dict(book=book, cache_size=4096, stride=stride, **change))
    for change in main[:2] + main[3:]:  # added later (indices above stay valid): a smaller cache, 256
        for book in BOOKS:
            rows.append(dict(book=book, cache_size=256, stride=128, **change))
    return rows


def config_of(row: dict) -> CacheConfig:
    keys = ("policy", "cache_size", "stride", "cascades", "beta", "head_reduce")
    return CacheConfig(**{k: row[k] for k in keys if k in row})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="local model directory (default: the embedded model)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--shard", type=int, default=0)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--deadline", type=float, default=float("inf"), help="seconds; no new run starts after it")
    ap.add_argument("--max-tokens", type=int, default=0, help="cut each book (0 = whole book)")
    ap.add_argument("--rows", default="", help="comma-separated plan indices to run (default: the whole plan)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    start = time.perf_counter()
    loaded = load_model(args.model, args.device, args.dtype)
    book_ids = {}
    for name, file in BOOKS.items():
        with open(os.path.join(DATA, file), encoding="utf-8") as f:
            ids = loaded.tokenizer.encode(f.read(), add_special_tokens=False)
        book_ids[name] = ids[: args.max_tokens] if args.max_tokens else ids
    prov = provenance()
    rows = plan()
    if args.rows:
        rows = [rows[int(i)] for i in args.rows.split(",")]
    for row in rows[args.shard :: args.shards]:
        if time.perf_counter() - start > args.deadline:
            print(f"deadline reached, skipping {row}", file=sys.stderr)
            continue
        config = config_of(row)
        ids = book_ids[row["book"]]
        with Runner(loaded.model, config, expected_tokens=len(ids)) as runner:
            res = perplexity(runner, rechunk([ids], config.stride))
        out = dict(row, policy=config.policy, cascades=config.n_cascades, beta=config.beta,
                   head_reduce=config.head_reduce, sinks=config.sinks, tokens=res.n_tokens, ppl=res.ppl,
                   ppl_err=res.ppl_err, nll_mean=res.nll_mean, seconds=res.seconds, tok_s=res.tokens_per_s,
                   model=loaded.model_id, model_hash=loaded.model_hash, dtype=str(loaded.dtype),
                   device=str(loaded.device), **prov)
        with open(args.out, "a") as f:
            f.write(json.dumps(out) + "\n")
        print(f"{row['book']:20s} {config.policy:7s} N={config.cache_size:5d} C={config.n_cascades} "
              f"β={config.beta} {config.head_reduce:4s} L={config.stride}: ppl {res.ppl:.4f} ± {res.ppl_err:.4f} "
              f"({res.tokens_per_s:.0f} tok/s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
