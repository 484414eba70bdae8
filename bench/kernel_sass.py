"""Compile the Triton kernels for an H200 (sm_90a) on a machine without a GPU, and print what ptxas made of each.

    python bench/kernel_sass.py [--kernels DIR] [--json OUT]

Each row is one kernel launch of one launcher call (the launchers run on CPU tensors; Triton's driver is replaced
by one that only compiles, so nothing executes): registers, spill stores/loads, shared memory, the number of SASS
instructions, a hash of the SASS with constant bank offsets (where the parameters live) and addresses dropped, and
a hash of the opcode sequence alone (blind to register numbering: a kernel that gained an unused parameter often
differs from before only in which registers the scheduler picked). Used to
show that a refactor of kernels/ leaves the compiled code as it was: run it on the old tree (`--kernels
OLD/kernels`, e.g. a `git worktree` of the previous commit) and on the new one, and compare the rows.

The calls are the shapes the engine runs most (D 128, bf16, 32 query / 8 KV heads, the default configs): a prefill
chunk with and without scores, a decode step, both over a plain and a paged cache, the pre-rotated route, RoPE of
the queries and the decoded token's cache push.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "_kernels_compiled"
ARCH = 90


class CompileOnlyDriver:
    """Enough of Triton's driver for `JITFunction.run` to compile for sm_90a; `run` is patched to never launch."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", ARCH, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def load(kernels_dir: Path, module: str) -> ModuleType:
    """`<kernels_dir>/<module>.py` as part of a private copy of the package (the folder has no __init__)."""
    if PACKAGE not in sys.modules:
        package = ModuleType(PACKAGE)
        package.__path__ = [str(kernels_dir)]
        sys.modules[PACKAGE] = package
    return importlib.import_module(f"{PACKAGE}.{module}")


def calls(kernels_dir: Path) -> dict:
    """label -> a function that runs one launcher on CPU tensors."""
    # the launchers' home since the Triton part left chunk_attention.py and paged_attention.py
    pa = ca = load(kernels_dir, "prefill_triton") if (kernels_dir / "prefill_triton.py").exists() else None
    ca = ca or load(kernels_dir, "chunk_attention")
    pa = pa or load(kernels_dir, "paged_attention")
    ema_weights = load(kernels_dir, "chunk_attention").ema_weights
    rope = load(kernels_dir, "rope")
    push = load(kernels_dir, "cache_push")
    dt, d, hq, hkv = torch.bfloat16, 128, 32, 8
    gen = torch.Generator().manual_seed(0)

    def rand(*size):
        return torch.randn(*size, generator=gen).to(dt)

    def chunk(n_q, n_k):
        return rand(1, hq, n_q, d), rand(1, hkv, n_k, d), rand(1, hkv, n_k, d), ema_weights(n_q, 0.999)

    def paged(n_q, n_past, cap=8192):
        ang = torch.arange(n_past + n_q).float()[:, None] * torch.ones(d)
        return dict(q=rand(1, hq, n_q, d), k_cache=rand(1, hkv, cap, d), v_cache=rand(1, hkv, cap, d),
                    order=torch.randperm(cap, generator=gen)[:n_past], k_new=rand(1, hkv, n_q, d),
                    v_new=rand(1, hkv, n_q, d), cos=ang.cos().to(dt), sin=ang.sin().to(dt), scale=d**-0.5,
                    ema=ema_weights(n_q, 0.999), n_sinks=64, head_reduce="max")

    q, k, v, ema = chunk(512, 512 + 4160)
    q1, k1, v1, ema1 = chunk(1, 4161)
    x, x1 = paged(512, 4160), paged(1, 4160)
    x_out = {**x, "ema": None}
    kb, vb = rand(1, hkv, 64 + 5 * 64, d), rand(1, hkv, 64 + 5 * 64, d)
    return {
        "chunk": lambda: ca.chunk_attention_triton(q, k, v, d**-0.5, ema, 64, "max"),
        "chunk_no_scores": lambda: ca.chunk_attention_triton(q, k, v, d**-0.5, None, 64, "max"),
        "chunk_mean_d64": lambda: ca.chunk_attention_triton(q[..., :64], k[..., :64], v[..., :64], 0.125, ema, 64,
                                                             "mean"),
        "decode": lambda: ca.chunk_attention_triton(q1, k1, v1, d**-0.5, ema1, 64, "max"),
        "paged": lambda: pa.chunk_attention_paged_triton(**x, prerotate=False),
        "paged_no_scores": lambda: pa.chunk_attention_paged_triton(**x_out, prerotate=False),
        "paged_prerotate": lambda: pa.chunk_attention_paged_triton(**x, prerotate=True),
        "paged_decode": lambda: pa.chunk_attention_paged_triton(**x1),
        "rope": lambda: rope.rope_triton(q.transpose(1, 2).contiguous().transpose(1, 2), x["cos"][:512],
                                         x["sin"][:512]),
        "push": lambda: push.push_token_triton(kb, vb, torch.rand(1, hkv, 5 * 64), torch.zeros(1, hkv, 64 + 320,
                                               dtype=torch.long), rand(1, hkv, 1, d), rand(1, hkv, 1, d),
                                               torch.rand(1, hkv), torch.tensor([64, 128, -200], dtype=torch.int32),
                                               1000, 64),
    }


OPERAND = re.compile(r"c\[0x[0-9a-f]+\]\[0x[0-9a-f]+\]|0x[0-9a-f]+|`\(\S+\)")


def _opcode(line: str) -> str:
    """The instruction's opcode with its modifiers, past any predicate (`@P0`, `@!PT`)."""
    words = line.split()
    return words[1] if words and words[0].startswith("@") and len(words) > 1 else (words[0] if words else "")


def sass_stats(cubin: bytes, ptx: str, dump: Path | None = None) -> dict:
    """Registers and spills from ptxas -v on the PTX (Triton's own flags), instruction count and opcode hash from
    the cubin's SASS."""
    from triton.backends.nvidia.compiler import get_ptxas

    tools = Path(get_ptxas(ARCH).path).parent
    with tempfile.TemporaryDirectory() as tmp:
        cub, src = Path(tmp, "k.cubin"), Path(tmp, "k.ptx")
        cub.write_bytes(cubin)
        src.write_text(ptx)
        sass = subprocess.run([str(tools / "cuobjdump"), "-sass", str(cub)], capture_output=True, text=True,
                              check=True).stdout
        log = subprocess.run([get_ptxas(ARCH).path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{ARCH}a",
                              str(src), "-o", str(Path(tmp, "k.o"))], capture_output=True, text=True, check=True).stderr
    body = [line.split("*/", 1)[1].strip().rstrip(";") for line in sass.splitlines()
            if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]
    norm = [OPERAND.sub("#", line) for line in body]
    if dump is not None:
        dump.write_text("\n".join(norm) + "\n")
    num = lambda pattern: int(m.group(1)) if (m := re.search(pattern, log)) else 0  # noqa: E731
    return dict(regs=num(r"Used (\d+) registers"), spill_stores=num(r"(\d+) bytes spill stores"),
                spill_loads=num(r"(\d+) bytes spill loads"), smem=num(r"(\d+) bytes smem"), n_sass=len(body),
                sass_hash=hashlib.sha256("\n".join(norm).encode()).hexdigest()[:12],
                opcode_hash=hashlib.sha256(" ".join(_opcode(line) for line in body).encode()).hexdigest()[:12])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernels", type=Path, default=ROOT / "kernels", help="the kernels folder to compile")
    ap.add_argument("--only", nargs="*", help="labels to compile (default: all)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--sass", type=Path, help="also write each launch's normalised SASS into this folder")
    args = ap.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    driver.set_active(CompileOnlyDriver())
    launched: list = []
    run = JITFunction.run

    def compile_only(self, *a, grid, warmup, **kw):
        kernel = run(self, *a, grid=grid, warmup=True, **kw)
        launched.append((self.fn.__name__, kernel))
        return kernel

    JITFunction.run = compile_only
    rows = []
    if args.sass:
        args.sass.mkdir(parents=True, exist_ok=True)
    print(f"# triton {triton.__version__}, torch {torch.__version__}, sm_{ARCH}a; kernels from {args.kernels}",
          file=sys.stderr)
    for label, call in calls(args.kernels.resolve()).items():
        if args.only and label not in args.only:
            continue
        launched.clear()
        call()
        for i, (name, kernel) in enumerate(launched):
            dump = args.sass / f"{label}.{i}.sass" if args.sass else None
            row = dict(call=label, launch=i, kernel=name, **sass_stats(kernel.asm["cubin"], kernel.asm["ptx"], dump))
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
