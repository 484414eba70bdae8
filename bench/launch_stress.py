"""Repeat the launch test's two-process run and count the runs whose stderr or exit status is wrong.

`cascadectl ppl CORPUS --each --json --nproc 2` over the corpus of tests/cli/test_launch.py (bench/fixtures.py: four small
files, one empty) with its tiny random model: every run must exit 1 (the empty file) with exactly one `error:` line
(rank 0's summary). Bad runs are appended, with their stderr, to --log. Load the machine beside it to shake out
races, e.g. two `python3 -c "while True: pass"`.

    python bench/launch_stress.py --seconds 600 --log bad.log
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # python bench/x.py: bench/checkout.py puts this checkout on sys.path
    import checkout  # noqa: F401

from bench.common import provenance  # noqa: E402
from bench.fixtures import SMALL, byte_model_dir, corpus, worker_env  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--log", default="launch_bad.log")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="launch-stress-") as tmp:
        model = byte_model_dir(Path(tmp) / "model")
        folder = corpus(Path(tmp) / "corpus", {"empty.txt": ""})
        cmd = [sys.executable, "-m", "cascadectl", "ppl", str(folder), "--each", "--json", "--model", str(model),
               "--device", "cpu", "--dtype", "fp32", *SMALL, "--nproc", "2"]
        end, runs, bad = time.monotonic() + args.seconds, 0, 0
        while time.monotonic() < end:
            runs += 1
            done = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=300)
            errors = sum(line.startswith("error:") for line in done.stderr.splitlines())
            if errors != 1 or done.returncode != 1:
                bad += 1
                with open(args.log, "a", encoding="utf-8") as f:
                    f.write(f"--- run {runs}: exit {done.returncode}, {errors} error lines\n{done.stderr}\n")
    print(json.dumps({"bench": "launch_stress", "runs": runs, "bad": bad, **provenance()}))


if __name__ == "__main__":
    main()
