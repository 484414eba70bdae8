"""bench/kernel_sass.py compiles the Triton kernels for sm_90a without a GPU (Triton's bundled ptxas) and reports
what ptxas made of them; here on the smallest kernel, the cache push, in a subprocess (it swaps Triton's driver)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import cascade_kernels._triton as kt

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(kt.triton is None, reason="triton is not installed")
def test_compiles_the_push_kernel_for_sm90():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_sass.py"), "--only", "push"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "TRITON_DEFAULT_FP_FUSION": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["call"], r["kernel"]) for r in rows] == [("push", "_push_kernel")]
    assert rows[0]["regs"] > 0 and rows[0]["n_sass"] > 0 and rows[0]["spill_stores"] == 0
