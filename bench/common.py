"""Provenance for benchmark rows, the one helper every bench script uses: command, machine, devices, versions,
git revision, time."""
from __future__ import annotations

import datetime
import os
import platform
import resource
import subprocess
import sys

import torch
import transformers


def provenance() -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        sha = ""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{cpu} ({os.cpu_count()} cpus, torch threads {torch.get_num_threads()})",
        "gpu": gpu,
        "device": gpu or "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "git": sha,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def book_ids(tokenizer, n_tokens: int) -> list[int]:
    """The bundled novel's tokens, repeated as needed to reach `n_tokens` of real prose."""
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "..", "data", "pride_and_prejudice.txt"), encoding="utf-8") as f:
        ids = tokenizer.encode(f.read(), add_special_tokens=False)
    out = []
    while len(out) < n_tokens:
        out.extend(ids)
    return out[:n_tokens]
