"""First load of a GGUF through cascadectl against transformers' own load of the same file, then the cached reload.

Each measurement runs in a fresh Python process (imports included in neither: both sides pay the same imports,
timed from after them), one after the other, alternating, `--repeats` times:

- `transformers`: AutoTokenizer + AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32), what
  a user of transformers runs to load the file;
- `first`: engine.models.load_model(FILE.gguf) into an empty CASCADECTL_HOME: the header check, the sha256,
  the conversion (the same transformers load), the safetensors write and the load from the cache;
- `cached`: the same call again, from the cache.

    OMP_NUM_THREADS=1 python bench/gguf_load.py [--gguf FILE] [--repeats 3]

Default file: the embedded SmolLM2-135M-Instruct Q4_1 GGUF. Prints one JSON row: seconds per run, medians,
first/transformers ratio, peak RSS of each kind, command, machine and versions."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # python bench/x.py: bench/checkout.py puts this checkout on sys.path
    import checkout  # noqa: F401

from bench.common import provenance  # noqa: E402

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import torch
kind, path = sys.argv[1], Path(sys.argv[2])
from engine import models
from transformers import AutoModelForCausalLM, AutoTokenizer
start = time.perf_counter()
if kind == "transformers":
    from transformers.utils import logging
    logging.set_verbosity_error(); logging.disable_progress_bar()
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
else:
    models.load_model(str(path), device="cpu", dtype="fp32")
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(kind: str, gguf: Path, home: Path) -> dict:
    env = {**os.environ, "CASCADECTL_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(gguf)], env=env, capture_output=True, text=True,
                         check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from engine.models import find_embedded_gguf

    gguf = args.gguf or find_embedded_gguf()
    runs: dict[str, list[dict]] = {"transformers": [], "first": [], "cached": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as home:
            runs["transformers"].append(run("transformers", gguf, Path(home)))
            runs["first"].append(run("first", gguf, Path(home)))
            runs["cached"].append(run("cached", gguf, Path(home)))
    median = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    print(json.dumps({
        "gguf": str(gguf), "size_bytes": gguf.stat().st_size,
        "seconds": {k: [round(r["seconds"], 2) for r in v] for k, v in runs.items()},
        "median_s": {k: round(v, 2) for k, v in median.items()},
        "first_over_transformers": round(median["first"] / median["transformers"], 3),
        "peak_rss_mib": {k: round(max(r["peak_rss_mib"] for r in v)) for k, v in runs.items()},
        "command": " ".join(sys.argv), **provenance(),
    }, indent=1))


if __name__ == "__main__":
    main()
