"""Ingest cost of the evidence store: `ask`'s question-first read with and without it, at the same settings.

Reads the first BYTES of the bundled novel (about 16K tokens) with the question pinned first, exactly as `ask`
does (question-guided cascade, λ = 1), alternating `--evidence 0` and the default store for ROUNDS rounds, and
prints the median seconds of each, their ratio, the KV cache bytes of each (the store sits inside --cache-size, so
they must be equal) and the provenance. Defaults are `ask`'s: cache 4096, 4 cascades, stride 1024 (clipped to
one sub-cache, 896, with the store).

    python bench/evidence_ingest.py [--rounds 2] [--bytes 65536] [--cache-size 4096] [--stride 1024]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import torch

if not __package__:  # python bench/x.py: bench/checkout.py puts this checkout on sys.path
    import checkout  # noqa: F401

from bench.common import provenance  # noqa: E402
from engine.config import CacheConfig  # noqa: E402
from engine.evidence import EvidenceSelector, default_slots, retrieval_layers  # noqa: E402
from engine.models import load_model  # noqa: E402
from engine.prompt import ASK_INSTRUCTION, ASK_REQUEST, build_prompt  # noqa: E402
from engine.retention import QuestionGuide  # noqa: E402
from engine.runner import Runner  # noqa: E402
from engine.reading import ingest  # noqa: E402

BOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "pride_and_prejudice.txt")


def read(lm, prompt, ids, config: CacheConfig, layers) -> tuple[float, int]:
    start = time.perf_counter()
    with Runner(lm.model, config, n_sinks=max(config.sinks, len(prompt.prefix_ids))) as runner:
        guide = QuestionGuide(runner, prompt.question_span, 1.0)
        keep = (EvidenceSelector(runner, guide, layers, len(prompt.prefix_ids)) if config.evidence
                else contextlib.nullcontext())
        with guide, keep:
            ingest(runner, prompt.prefix_ids, [ids])
        return time.perf_counter() - start, runner.cache.nbytes()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--bytes", type=int, default=65536)
    ap.add_argument("--cache-size", type=int, default=4096)
    ap.add_argument("--stride", type=int, default=1024)
    args = ap.parse_args()
    lm = load_model(None, "cpu", "auto")
    with open(BOOK, encoding="utf-8") as f:
        text = f.read()[: args.bytes]
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    prompt = build_prompt(lm.tokenizer, ASK_INSTRUCTION, ASK_REQUEST, "Who is Mr. Bingley?", question_first=True)
    plain = CacheConfig(cache_size=args.cache_size, stride=args.stride)
    slots = default_slots(plain.cache_size, plain.cascades)
    kept = plain.with_evidence(slots)
    layers = retrieval_layers(lm)  # calibrated (or read from its cache) before any timing
    times: dict[str, list[float]] = {"evidence 0": [], f"evidence {slots}": []}
    sizes = {}
    for _ in range(args.rounds):
        for name, config in (("evidence 0", plain), (f"evidence {slots}", kept)):
            seconds, size = read(lm, prompt, ids, config, layers)
            times[name].append(seconds)
            sizes[name] = size
            print(f"{name:>14}: {seconds:7.2f} s ({len(ids) / seconds:,.0f} tok/s), stride {config.stride}", flush=True)
    a, b = (statistics.median(v) for v in times.values())
    print(json.dumps({"tokens": len(ids), "seconds": times, "median_ratio": b / a, "kv_cache_bytes": sizes,
                      "provenance": provenance()}, indent=2))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
