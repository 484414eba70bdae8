"""Several questions decoded together (engine/batch_answer.py) against one question, and against one by one.

After reading an input through a full, evicting cascade, it times decode steps, interleaved round by round so that
machine noise falls on every loop alike:
  one_by_one  `ask --no-batch`: one question's answer from a copy of the cache, `Runner.decode` (on CUDA a
              replayed CUDA graph of the evicting step); ms per generated token
  batch_B     `ask -q ... (B times)`: one step feeds one token of each of B questions from the frozen cache
              (`AnswerBatch.decode`, on CUDA a replayed graph); ms per step, for B in --batches
  room_1      CPU only: one question whose tail lies in the frozen copy's room (`frozen_batch`,
              what `ask` with one question and `summarize` do on a CPU): one flash call a step over
              [document | tail], nothing to merge
and reports each loop's median, batch_B's step time over batch_1's (the issue's target: <= 1.3 up to 8
questions) and over one_by_one's, and on CUDA the GPU kernel time per step (profiler).

CPU (default): the embedded model, `--tokens` of the novel, cache 4096, stride 1024, the dtype `--dtype`, the
linears as `--weights` loads them (native: dense; auto, the CLI's default: int4 for the embedded model).
GPU (`--gpu`): a random-weight Llama-3.1-8B-shaped model (bf16), `--tokens` random ids through cache 65,536 + 64
sinks, 8 sub-caches, stride 4096 (bench/gpu_model.py's setting).

    python bench/answer_batch.py [--tokens 8192] [--batches 1,2,4,8] [--rounds 6] [--steps 8] [--weights auto]
    python bench/answer_batch.py --gpu --tokens 131072 [--profile]

Prints one JSON row with the command, machine and versions."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

if not __package__:  # python bench/x.py: bench/checkout.py puts this checkout on sys.path
    import checkout  # noqa: F401

from bench.common import provenance  # noqa: E402
from engine.batch_answer import AnswerBatch, SharedDocument, frozen_batch  # noqa: E402
from engine.config import CacheConfig  # noqa: E402
from engine.reading import forked  # noqa: E402
from engine.runner import Runner  # noqa: E402

NOVEL = Path(__file__).resolve().parent.parent / "data" / "pride_and_prejudice.txt"


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _read(args):
    """(runner, request ids per question, device) with the cache full after `args.tokens` tokens."""
    if args.gpu:
        from bench.gpu_model import build_model
        model = build_model(argparse.Namespace(tiny=False), "cuda")
        config = CacheConfig(policy="cascade", cache_size=65536, cascades=8, sinks=64, stride=4096)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=g)
        requests = [torch.randint(0, model.config.vocab_size, (24,), generator=g).tolist()
                    for _ in range(max(args.batches))]
    else:
        from engine import models
        loaded = models.load_model(None, "cpu", args.dtype, weights=args.weights)
        model = loaded.model
        config = CacheConfig(policy="cascade", cache_size=4096, cascades=4, stride=1024)
        text = NOVEL.read_text(encoding="utf-8")
        ids = torch.tensor([loaded.tokenizer(text[: args.tokens * 8])["input_ids"][: args.tokens]])
        asked = [f"Question {i}: who is mentioned in the {w} chapter?" for i, w in
                 enumerate(("first", "second", "third", "last", "middle", "next", "other", "final"))]
        requests = [loaded.tokenizer(q)["input_ids"] for q in asked]
        requests = (requests * (max(args.batches) // len(requests) + 1))[: max(args.batches)]
    runner = Runner(model, config)
    dev = runner.cache.shape.device
    t0 = time.perf_counter()
    for i in range(0, ids.shape[1], config.stride):
        runner.step(ids[:, i : i + config.stride].to(dev))
    _sync(dev)
    return runner, requests, dev, time.perf_counter() - t0


def _kernel_ms(step, dev: torch.device, table: str = "") -> float | None:
    """GPU kernel time of one call of `step`, summed over its kernels (profiler), in ms; with `table` (a name),
    also print the kernels by GPU time to stderr."""
    if dev.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    _sync(dev)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        _sync(dev)
    if table:
        print(f"{table}: one step's kernels by GPU time", file=sys.stderr)
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=14), file=sys.stderr)
    return sum(e.self_device_time_total for e in prof.key_averages()
               if (getattr(e, "self_device_time_total", 0) or 0) > 0) / 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192, help="tokens read before answering")
    ap.add_argument("--batches", default="1,2,4,8", help="questions per batch, comma-separated")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=8, help="decode steps per round and loop")
    ap.add_argument("--dtype", default="auto", help="CPU: the model's dtype (auto, fp32, bf16)")
    ap.add_argument("--weights", default="native", help="CPU: --weights as the CLI takes it (the CLI's default "
                    "is auto: the embedded model's decoder linears packed to int4)")
    ap.add_argument("--gpu", action="store_true", help="the 8B shape on CUDA instead of the embedded model")
    ap.add_argument("--profile", action="store_true", help="CUDA: print one step's kernels of each loop (stderr)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    args.batches = sorted({int(b) for b in args.batches.split(",")} | {1})
    runner, requests, dev, read_s = _read(args)
    n_past = runner.cache.n_past
    doc = SharedDocument(runner)
    warm = 3
    room = max(map(len, requests)) + warm + args.rounds * args.steps + 2
    batches = {}  # loop name -> its batch, every question's request read
    for b in args.batches:
        batches[f"batch_{b}"] = AnswerBatch(runner, doc, b, room)
    if dev.type == "cpu":
        batches["room_1"] = frozen_batch(runner, 1, room)  # what ask and summarize build for one question
    for batch in batches.values():
        for r in range(batch.rows):
            batch.prefill(r, requests[r])
    tokens = {name: [1] * batch.rows for name, batch in batches.items()}

    def batch_step(name: str) -> None:
        logits = batches[name].decode(tokens[name], [True] * batches[name].rows)
        tokens[name] = logits.argmax(-1).tolist()

    token = [requests[0][-1]]

    def single_step() -> None:
        token[0] = int(runner.decode(token[0]).argmax())

    steps = {"one_by_one": single_step, **{name: (lambda name=name: batch_step(name)) for name in batches}}
    rounds: dict[str, list[float]] = {name: [] for name in steps}
    kernels: dict[str, float | None] = {}
    with forked(runner):  # one question's evicting answer, from a copy (what --no-batch does)
        runner.step(torch.tensor([requests[0]], device=dev))
        for _ in range(warm):
            for step in steps.values():
                step()
        for _ in range(args.rounds):
            for name, step in steps.items():
                _sync(dev)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                _sync(dev)
                rounds[name].append(round((time.perf_counter() - t0) / args.steps * 1000, 3))
        for name, step in steps.items():
            kernels[name] = _kernel_ms(step, dev, name if args.profile else "")
        graph = runner.decode_report()
    median = {k: sorted(v)[len(v) // 2] for k, v in rounds.items()}
    row = {"bench": "answer_batch", "device": str(dev), "tokens_read": args.tokens, "read_s": round(read_s, 1),
           "weights": None if args.gpu else args.weights,
           "document_tokens": n_past, "frozen_bytes": doc.nbytes(),
           "median_ms_per_step": median, "rounds_ms": rounds,
           "step_over_batch_1": {k: round(v / median["batch_1"], 3) for k, v in median.items()},
           "step_over_one_by_one": {k: round(v / median["one_by_one"], 3) for k, v in median.items()},
           "kernel_ms_per_step": kernels,
           "graphs": {"one_by_one": graph, **{name: batch.graph_counts.as_dict() for name, batch in batches.items()}},
           **provenance()}
    print(json.dumps(row))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    runner.close()


if __name__ == "__main__":
    main()
