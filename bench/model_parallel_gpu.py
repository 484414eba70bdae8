"""One model over several GPUs: a random-weight Llama-70B-shaped model (bf16), layers split over --gpus cards,
ingesting --tokens tokens through the cascade; tokens/s, decode ms/token and memory per GPU.

Memory plan (printed before anything is allocated; B = bytes, bf16 weights, Llama-3.1-70B shapes):
  per layer   q,o 2·H·H + k,v 2·H·(Hkv·D) + MLP 3·H·I = 855.6M params = 1.59 GiB
  per layer   cascade cache K,V 2·Hkv·(S+N)·D·2 B + indices Hkv·(S+N)·8 B + scores Hkv·N·4 B = 0.26 GiB (N = 64K)
  outside     embedding + LM head 2·V·H = 2.1B params = 3.9 GiB
  80 layers   131.4 GiB of weights + 20.5 GiB of cache: too much for one 80 GB card, about 40 GiB on each of 4.
The plan also gives the largest layer count that fits the visible cards (with --headroom GiB kept free per card
for activations and the allocator); --layers above it fails before any allocation.

The model is built without weights (accelerate's init_empty_weights), each tensor is then drawn directly on its
card, and accelerate's dispatch_model adds the hooks that move activations between cards. Layers are split in
contiguous equal blocks; the embedding sits on the first card, the final norm and LM head on the last.

    python bench/model_parallel_gpu.py --gpus 4 --tokens 131072 --out $OUT/model_parallel.jsonl
    python bench/model_parallel_gpu.py --tiny            # the same code path on a tiny model (any machine)

Prints one JSON row per measurement with the card, versions and command."""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

if not __package__:  # python bench/x.py: bench/checkout.py puts this checkout on sys.path
    import checkout  # noqa: F401

from bench.common import provenance  # noqa: E402
from engine.config import CacheConfig  # noqa: E402
from engine.runner import Runner  # noqa: E402

GiB = 2**30
LLAMA_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072)
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, head_dim=32, vocab_size=1000, max_position_embeddings=8192)


def fail(msg: str) -> None:
    print(f"model_parallel_gpu: {msg}", file=sys.stderr)
    sys.exit(2)


def plan(shape: dict, args, n_dev: int, card_bytes: int) -> dict:
    """Bytes per layer (weights, cache), outside the layers, and the largest layer count that fits."""
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv, d = shape["num_key_value_heads"], shape["head_dim"]
    q = shape["num_attention_heads"] * d
    layer_params = h * q * 2 + h * kv * d * 2 + 3 * h * i + 2 * h
    slots = args.sinks + args.cache_size
    cache_layer = 2 * kv * slots * d * 2 + kv * slots * 8 + kv * args.cache_size * 4
    outside = (2 * v * h + h) * 2
    per_layer = layer_params * 2 + cache_layer
    usable = n_dev * (card_bytes - args.headroom * GiB)
    return {"layer_weights_GiB": round(layer_params * 2 / GiB, 3), "layer_cache_GiB": round(cache_layer / GiB, 3),
            "outside_GiB": round(outside / GiB, 3),
            "total_GiB": round((outside + per_layer * shape["num_hidden_layers"]) / GiB, 1),
            "params_B": round((layer_params * shape["num_hidden_layers"] + outside / 2) / 1e9, 2),
            "max_layers_that_fit": max(0, int((usable - outside) // per_layer)),
            "usable_GiB": round(usable / GiB, 1)}


def device_map(n_layers: int, devices: list) -> dict:
    """Contiguous equal blocks of layers; embedding on the first device, norm and LM head on the last."""
    n = len(devices)
    placement = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0],
                 "model.norm": devices[-1], "lm_head": devices[-1]}
    placement |= {f"model.layers.{i}": devices[i * n // n_layers] for i in range(n_layers)}
    return placement


def build(shape: dict, placement: dict, dtype: torch.dtype):
    from accelerate import dispatch_model, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, **shape)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    gen = {}
    for name, p in model.named_parameters():
        module = next(k for k in sorted(placement, key=len, reverse=True) if name.startswith(k + "."))
        dev = torch.device(placement[module])
        g = gen.setdefault(dev, torch.Generator(device=dev).manual_seed(0))
        value = torch.empty(p.shape, dtype=dtype, device=dev)
        if "norm" in name:
            value.fill_(1.0)
        else:
            value.normal_(0.0, 0.02, generator=g)
        set_module_tensor_to_device(model, name, dev, value=value)
    model.model.rotary_emb.to(placement["model.rotary_emb"])  # its inv_freq buffer was built on the CPU
    if len(set(placement.values())) > 1:
        model = dispatch_model(model, device_map=placement)  # hooks that carry activations between cards
    return model.eval()


def sync_all(devices: list) -> None:
    for d in devices:
        if torch.device(d).type == "cuda":
            torch.cuda.synchronize(d)


@torch.inference_mode()
def ingest(model, config: CacheConfig, n_tokens: int, devices: list, emit) -> Runner:
    runner = Runner(model, config, expected_tokens=n_tokens)
    assert (runner.cache.shape.layer_devices is not None) == (len(set(map(str, devices))) > 1)
    home = runner.cache.shape.device
    g = torch.Generator().manual_seed(1)
    for d in devices:
        if torch.device(d).type == "cuda":
            torch.cuda.reset_peak_memory_stats(d)
    sync_all(devices)
    t0 = time.perf_counter()
    done = chunks = 0
    while done < n_tokens:
        n = min(config.stride, n_tokens - done)
        runner.step(torch.randint(0, model.config.vocab_size, (1, n), generator=g).to(home))
        done, chunks = done + n, chunks + 1
        if chunks % 16 == 0:
            sync_all(devices)
            el = time.perf_counter() - t0
            print(f"  ingest {done:,}/{n_tokens:,} tokens: {el:.1f} s ({done / el:,.0f} tok/s)", flush=True)
    sync_all(devices)
    sec = time.perf_counter() - t0
    emit({"part": "ingest", "tokens": done, "stride": config.stride, "seconds": round(sec, 3),
          "tokens_per_s": round(done / sec, 1), "n_past": runner.cache.n_past,
          "kv_cache_GiB": round(runner.cache.nbytes() / GiB, 2), **memory(devices)})
    return runner


@torch.inference_mode()
def decode(runner: Runner, steps: int, devices: list, emit) -> None:
    tok = torch.zeros(1, 1, dtype=torch.long, device=runner.cache.shape.device)
    for _ in range(4):  # warm-up
        tok = runner.logits(runner.step(tok)[:, -1:]).argmax(-1)
    sync_all(devices)
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = runner.logits(runner.step(tok)[:, -1:]).argmax(-1)
    sync_all(devices)
    emit({"part": "decode", "steps": steps, "ms_per_token": round(1000 * (time.perf_counter() - t0) / steps, 2),
          **memory(devices)})


def memory(devices: list) -> dict:
    cuda = [torch.device(d) for d in dict.fromkeys(map(str, devices)) if torch.device(d).type == "cuda"]
    return {"max_memory_allocated_GiB": [round(torch.cuda.max_memory_allocated(d) / GiB, 2) for d in cuda],
            "memory_allocated_GiB": [round(torch.cuda.memory_allocated(d) / GiB, 2) for d in cuda]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--layers", type=int, default=80, help="decoder layers (80 = Llama-3.1-70B)")
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--cache-size", type=int, default=65536)
    ap.add_argument("--sinks", type=int, default=64)
    ap.add_argument("--stride", type=int, default=4096)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--headroom", type=float, default=6.0, help="GiB per card kept for activations")
    ap.add_argument("--tiny", action="store_true", help="tiny model, CPU if no GPU: checks the code path")
    ap.add_argument("--out", default=None, help="append JSON rows to this file")
    args = ap.parse_args()

    if args.tiny:
        shape, dtype = dict(TINY), torch.float32
        args.tokens, args.cache_size, args.stride, args.sinks = 2048, 512, 128, 4
        n = min(args.gpus, torch.cuda.device_count())
        devices = [f"cuda:{i}" for i in range(n)] or ["cpu"]
        card = torch.cuda.get_device_properties(0).total_memory if n else 64 * GiB
    else:
        shape, dtype = dict(LLAMA_70B, num_hidden_layers=args.layers), torch.bfloat16
        if torch.cuda.device_count() < args.gpus:
            fail(f"--gpus {args.gpus} but {torch.cuda.device_count()} CUDA device(s) are visible")
        try:
            import accelerate  # noqa: F401
            import triton  # noqa: F401
        except ImportError as e:
            fail(f"{e.name} is missing; the GPU path needs accelerate and triton")
        devices = [f"cuda:{i}" for i in range(args.gpus)]
        card = min(torch.cuda.get_device_properties(i).total_memory for i in range(args.gpus))
    config = CacheConfig(policy="cascade", cache_size=args.cache_size, sinks=args.sinks, stride=args.stride)
    layout = plan(shape, args, len(devices), card)
    base = {"bench": "model_parallel_gpu", "layers": shape["num_hidden_layers"], "gpus": len(devices),
            "dtype": str(dtype).removeprefix("torch."), "cache_size": args.cache_size, "stride": args.stride,
            **provenance()}

    def emit(row: dict) -> None:
        row = {**base, **row}
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    emit({"part": "plan", **layout})
    if shape["num_hidden_layers"] > layout["max_layers_that_fit"]:
        fail(f"{shape['num_hidden_layers']} layers need {layout['total_GiB']} GiB but {len(devices)} card(s) leave "
             f"{layout['usable_GiB']} GiB; at most --layers {layout['max_layers_that_fit']} fits")
    # the cascade's positions stop at sinks + cache + stride whatever --tokens is: only that must fit the window
    config.check_positions(config.sinks, shape["max_position_embeddings"])

    t0 = time.perf_counter()
    model = build(shape, device_map(shape["num_hidden_layers"], devices), dtype)
    sync_all(devices)
    emit({"part": "build", "seconds": round(time.perf_counter() - t0, 1), **memory(devices)})
    runner = ingest(model, config, args.tokens, devices, emit)
    decode(runner, args.decode_steps, devices, emit)


if __name__ == "__main__":
    main()
