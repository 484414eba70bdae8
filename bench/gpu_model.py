"""Whole-model prefill and decode on a GPU: a random-weight Llama-3.1-8B-shaped model (bf16) through Runner.

Parts, each under its own wall-clock budget (a part whose estimate does not fit what is left is skipped):
  ingest    Runner.step over T random ids in chunks of --stride (hidden states only, no LM head), for each T of
            --tokens; seconds, tokens/s, torch.cuda.max_memory_allocated, and the host time spent in
            cache.begin (planning). A longer T is skipped when the previous one extrapolates past the budget.
  decode    after every complete ingest (cache full; is it constant after 1M tokens?): greedy steps through the
            cascade as engine/generate.py takes them (runner.decode + argmax read back), replayed as a CUDA graph
            and run eagerly, against the baseline,
            the same HF model (its own SDPA attention) with a transformers DynamicCache holding --dense-past random
            K/V tokens per layer. Interleaved: --decode-rounds rounds of --decode-steps steps of each, alternating,
            so that host noise falls on both; median ms/token of each (host clock, synchronised at both ends), the
            ratio, every round's ratio, and the GPU kernel time per token of each (profiler).
  full_1m   arithmetic only: full-attention KV bytes at 1M tokens vs the card's memory.

    python bench/gpu_model.py --tokens 131072,1048576 --out $OUT/gpu_model.jsonl

Tiny CPU check of the logic: python bench/gpu_model.py --tiny
Prints one JSON row per measurement (card, torch/triton/transformers versions, command)."""
from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time

import torch

if not __package__:  # python bench/x.py: bench/checkout.py puts this checkout on sys.path
    import checkout  # noqa: F401

from bench.common import provenance  # noqa: E402
from engine.config import CacheConfig  # noqa: E402
from engine.runner import Runner  # noqa: E402

T0 = time.perf_counter()


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def build_model(args, dev: str):
    from transformers import AutoModelForCausalLM, LlamaConfig
    if args.tiny:
        kw = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=32, vocab_size=1000, max_position_embeddings=4096)
        dtype = torch.float32
    else:  # Llama-3.1-8B shapes
        kw = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072)
        dtype = torch.bfloat16
    cfg = LlamaConfig(rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, **kw)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def cache_config(args) -> CacheConfig:
    return CacheConfig(policy="cascade", cache_size=args.cache_size, cascades=args.cascades, sinks=args.sinks,
                       stride=args.stride, beta=args.beta)


def ingest(model, args, n_tokens: int, dev: str, deadline: float, emit, extra=None):
    """Runner.step over n_tokens random ids; returns (runner, row). Stops early (row['complete']=False) at deadline."""
    runner = Runner(model, cache_config(args), expected_tokens=n_tokens)
    plan_s = [0.0]
    begin = runner.cache.begin

    def timed_begin(n):
        t = time.perf_counter()
        r = begin(n)
        plan_s[0] += time.perf_counter() - t
        return r

    runner.cache.begin = timed_begin
    g = torch.Generator(device="cpu").manual_seed(1)
    vocab = model.config.vocab_size
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(dev)
    t0 = time.perf_counter()
    done, chunks, complete = 0, 0, True
    first_chunk_s = None
    while done < n_tokens:
        n = min(args.stride, n_tokens - done)
        ids = torch.randint(0, vocab, (1, n), generator=g).to(dev)
        runner.step(ids)
        done += n
        chunks += 1
        if chunks == 1:
            sync(dev)
            first_chunk_s = time.perf_counter() - t0
        if chunks % 32 == 0:
            sync(dev)
            el = time.perf_counter() - t0
            print(f"  ingest {done}/{n_tokens} tokens: {el:.1f} s ({done / el:.0f} tok/s)", flush=True)
        if time.perf_counter() > deadline and done < n_tokens:
            complete = False
            break
    sync(dev)
    sec = time.perf_counter() - t0
    row = {"part": "ingest", "tokens": done, "tokens_target": n_tokens, "complete": complete, "chunks": chunks,
           "stride": args.stride, "seconds": round(sec, 3), "tokens_per_s": round(done / sec, 1),
           "first_chunk_s": round(first_chunk_s or 0.0, 3), "host_plan_s": round(plan_s[0], 3),
           "n_past": runner.cache.n_past}
    if dev == "cuda":
        row["max_memory_allocated_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    row.update(extra or {})
    emit(row)
    del runner.cache.begin  # drop the instance attribute (re-assigning the bound method would make a ref cycle)
    return runner, row


@torch.inference_mode()
def cascade_stepper(runner, graph: bool):
    """Greedy decode through the cascade as engine/generate.py runs it: `runner.decode(token)` (the step and the LM
    head; with `graph`, a replayed CUDA graph once captured) and the argmax read back to the host as an int."""
    tok = int(torch.randint(0, runner.model.config.vocab_size, ()))

    def step(n: int) -> None:
        nonlocal tok
        runner.graph_decode = graph
        for _ in range(n):
            tok = int(runner.decode(tok).argmax())
    return step


@torch.inference_mode()
def twin(model):
    """A second module tree over the same parameters and buffers, made before any Runner patches `model`: the
    dense baseline runs its own attention while a Runner holds the original patched (no weight copy)."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def dense_stepper(model, args, dev: str):
    """The HF model (its own SDPA attention) over a transformers cache pre-filled with --dense-past random K/V
    tokens per layer; each step appends one token, as a dense decode does. --dense-cache dynamic (DynamicCache:
    grows by concatenation every step) or static (StaticCache: preallocated for every step this script takes,
    written in place; SDPA then reads the whole preallocated length under a mask). Returns (step, cache)."""
    from transformers import DynamicCache, StaticCache
    cfg = model.config
    p = next(model.parameters())
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if args.dense_cache == "static":
        steps = 2 * (args.decode_warm + args.decode_rounds * args.decode_steps + 8)  # both loops' calls, and spare
        cache = StaticCache(config=cfg, max_cache_len=args.dense_past + steps)
    else:
        cache = DynamicCache(config=cfg) if "config" in DynamicCache.__init__.__code__.co_varnames else DynamicCache()
    for i in range(cfg.num_hidden_layers):
        k = torch.randn(1, cfg.num_key_value_heads, args.dense_past, hd, dtype=p.dtype, device=dev)
        # older transformers' StaticCache writes at cache_kwargs["cache_position"]; newer ones count by themselves
        cache.update(k, torch.randn_like(k), i, {"cache_position": torch.arange(args.dense_past, device=dev)})
    state = {"tok": torch.randint(0, cfg.vocab_size, (1, 1)).to(dev), "pos": args.dense_past}

    @torch.inference_mode()
    def step(n: int) -> None:
        for _ in range(n):
            pos = state["pos"]
            out = model(input_ids=state["tok"], past_key_values=cache, use_cache=True,
                        position_ids=torch.tensor([[pos]], device=dev), cache_position=torch.tensor([pos], device=dev))
            state["tok"] = out.logits[:, -1:].float().argmax(-1)
            state["pos"] = pos + 1
    return step, cache


def ms_per_token(step, n: int, dev: str) -> float:
    sync(dev)
    t0 = time.perf_counter()
    step(n)
    sync(dev)
    return 1000 * (time.perf_counter() - t0) / n


def kernel_time(step, n: int, dev: str) -> tuple:
    """GPU kernels' own durations summed per token (profiler), device events per token, and the 12 costliest
    kernels: the device's work without launch gaps, how many launches it took, and where it goes."""
    if dev != "cuda":
        return None, None, []
    from torch.profiler import ProfilerActivity, profile
    sync(dev)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(n)
        sync(dev)
    device_events = [e for e in prof.key_averages() if (getattr(e, "self_device_time_total", 0) or 0) > 0]
    top = sorted(device_events, key=lambda e: -e.self_device_time_total)[:12]
    kernels = [{"name": e.key[:90], "ms_per_token": round(e.self_device_time_total / 1000 / n, 3),
                "calls_per_token": e.count / n} for e in top]
    return (sum(e.self_device_time_total for e in device_events) / 1000 / n,
            sum(e.count for e in device_events) / n, kernels)


def _decode_config() -> dict:
    import cascade_kernels.decode_attention as da
    return {**da.LAUNCH_DEFAULTS, **da.PAGED_DECODE_CONFIG}


def decode_compare(runner, dense_model, args, dev: str, emit) -> None:
    """Cascade decode at the runner's cache, replayed as a CUDA graph and run eagerly, vs dense SDPA decode over
    --dense-past tokens, interleaved: rounds of --decode-steps steps of each, in turn, so that host noise falls on
    all alike. Reports the median ms/token of each, the ratios of the medians, every round's numbers, and the GPU
    kernel time per token of each (profiler), which host noise does not touch."""
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    graph = cascade_stepper(runner, graph=True)
    cascade = cascade_stepper(runner, graph=False)
    dense, dense_cache = dense_stepper(dense_model, args, dev)
    with torch.inference_mode():
        graph(args.decode_warm)
        cascade(args.decode_warm)
        dense(args.decode_warm)
        rounds = []
        for _ in range(args.decode_rounds):
            rounds.append((ms_per_token(cascade, args.decode_steps, dev), ms_per_token(dense, args.decode_steps, dev),
                           ms_per_token(graph, args.decode_steps, dev)))
        k_cascade, n_cascade, top_cascade = kernel_time(cascade, 8, dev)
        k_dense, n_dense, top_dense = kernel_time(dense, 8, dev)
        k_graph, n_graph, top_graph = kernel_time(graph, 8, dev)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    c_ms, d_ms, g_ms = (med([r[i] for r in rounds]) for i in range(3))
    report = runner.decode_report()  # None off CUDA
    counts = None if report is None else {k: report[k] for k in ("eager", "captured", "replayed")}
    rnd = lambda x: None if x is None else round(x, 3)  # noqa: E731
    row = {"part": "decode_compare", "rounds": args.decode_rounds, "steps_per_round": args.decode_steps,
           "tokens_ingested": runner.cache.seen, "n_past": runner.cache.n_past, "dense_past": args.dense_past,
           "dense_cache": args.dense_cache,
           # cascade_*: the eager step (runner.graph_decode False); graph_*: the same step replayed as a CUDA graph
           "cascade_ms_per_token": round(c_ms, 3), "dense_ms_per_token": round(d_ms, 3),
           "graph_ms_per_token": round(g_ms, 3),
           "ratio_of_medians": round(c_ms / d_ms, 4), "graph_over_dense": round(g_ms / d_ms, 4),
           "graph_speedup_over_eager": round(c_ms / g_ms, 3),
           "round_ratios": [round(c / d, 4) for c, d, _ in rounds],
           "rounds_ms": [[round(x, 3) for x in r] for r in rounds], "rounds_order": ["cascade", "dense", "graph"],
           "cascade_kernel_ms_per_token": rnd(k_cascade), "dense_kernel_ms_per_token": rnd(k_dense),
           "graph_kernel_ms_per_token": rnd(k_graph),
           "cascade_kernels_per_token": n_cascade, "dense_kernels_per_token": n_dense,
           "graph_kernels_per_token": n_graph, "graph_counts": counts,
           "cascade_top_kernels": top_cascade, "dense_top_kernels": top_dense, "graph_top_kernels": top_graph,
           "paged_decode_config": _decode_config()}
    if k_cascade and k_dense:
        row["kernel_ratio"] = round(k_cascade / k_dense, 4)
    if k_graph:
        row["graph_wall_over_kernel"] = round(g_ms / k_graph, 3)
    if dev == "cuda":
        row["max_memory_allocated_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    emit(row)
    del dense_cache


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="131072,1048576")
    ap.add_argument("--stride", type=int, default=4096)
    ap.add_argument("--cache-size", default="65536",
                    help="tokens, or auto: what `--cache-size auto` picks for this model on this card for an input "
                         "too long to read exactly (engine/sizing.py; cascades, sinks and stride become its own)")
    ap.add_argument("--cascades", type=int, default=8)
    ap.add_argument("--sinks", type=int, default=64)
    ap.add_argument("--beta", type=float, default=0.9999)
    ap.add_argument("--decode-steps", type=int, default=16, help="steps per round and policy")
    ap.add_argument("--decode-rounds", type=int, default=8)
    ap.add_argument("--decode-warm", type=int, default=4)
    ap.add_argument("--dense-past", type=int, default=65536)
    ap.add_argument("--dense-cache", choices=("dynamic", "static"), default="dynamic",
                    help="the dense baseline's transformers cache (see dense_stepper)")
    ap.add_argument("--budget", type=float, default=420.0, help="total wall seconds for this script")
    ap.add_argument("--tiny", action="store_true", help="tiny fp32 model on CPU: checks the logic only")
    ap.add_argument("--decode-config", default="",
                    help="JSON of the paged decode config and launch options to use (e.g. bench/decode_kernels.py's best)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.decode_config:
        import cascade_kernels.decode_attention as da
        # launch options (MERGE_BLOCK_N) may sit in the config too: the kernels' _split lets them override LAUNCH_DEFAULTS
        da.PAGED_DECODE_CONFIG = {**da.PAGED_DECODE_CONFIG, **json.loads(args.decode_config)}
    if args.tiny:
        args.tokens = "1024,4096" if args.tokens == ap.get_default("tokens") else args.tokens
        args.cache_size, args.stride, args.cascades, args.sinks = 512, 128, 4, 16
        args.dense_past, args.decode_steps, args.decode_rounds = 512, 2, 2
    dev = "cpu" if args.tiny else "cuda"
    deadline = T0 + args.budget
    prov = provenance()
    print(json.dumps(prov), flush=True)

    def emit(row: dict) -> None:
        row = {**row, **prov, "elapsed_s": round(time.perf_counter() - T0, 1)}
        print("JSON " + json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    t = time.perf_counter()
    model = build_model(args, dev)
    sync(dev)
    dense_model = twin(model)
    n_params = sum(p.numel() for p in model.parameters())
    emit({"part": "build", "seconds": round(time.perf_counter() - t, 2), "params": n_params,
          "weights_GiB": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30, 2)})

    # full attention at 1M tokens: arithmetic only
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    esz = next(model.parameters()).element_size()
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * hd * esz * 1048576
    card = torch.cuda.get_device_properties(0).total_memory if dev == "cuda" else 0
    emit({"part": "full_attention_1M_kv", "kv_bytes": kv, "kv_GiB": kv / 2**30, "card_bytes": card,
          "fits": bool(card and kv < card), "note": "computed, not run"})

    if args.cache_size == "auto":  # the CLI's default, for an input longer than the model's positions
        from engine.sizing import long_input_config, memory_budget
        base = CacheConfig(policy="cascade", beta=args.beta)
        limit = int(model.config.max_position_embeddings)
        auto, sizing = long_input_config(base, model, limit, base.sinks, 0, memory_budget(dev))
        args.cache_size, args.cascades, args.sinks, args.stride = auto.cache_size, auto.cascades, auto.sinks, auto.stride
        emit({"part": "auto_size", **sizing.as_dict(), "cascades": auto.cascades, "sinks": auto.sinks})
    args.cache_size = int(args.cache_size)
    tokens = [int(x) for x in args.tokens.split(",") if x]
    last = None  # (tokens, seconds) of the last complete ingest
    for i, n in enumerate(tokens):
        left = deadline - time.perf_counter()
        if last is not None:
            est = last[1] * n / last[0]
            if est > left - 10:
                # does not fit: run what fits (a partial row, complete=False) unless too little is left
                emit({"part": "ingest_estimate", "tokens_target": n, "fits": False,
                      "estimate_s": round(est, 1), "left_s": round(left, 1)})
                if left < 30:
                    continue
        runner, row = ingest(model, args, n, dev, deadline - 5, emit)
        if row["complete"]:
            last = (row["tokens"], row["seconds"])
            # decode at a full cache, and again after every later complete ingest (constant after 1M tokens?)
            if deadline - time.perf_counter() > 40 or args.tiny:
                decode_compare(runner, dense_model, args, dev, emit)
        runner.close()
        del runner
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
    print(f"done in {time.perf_counter() - T0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
