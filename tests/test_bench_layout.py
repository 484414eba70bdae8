"""bench/ stands on its own: no bench script imports tests/, and a script runs both as `python bench/x.py` (the
docs' way: bench/checkout.py puts the checkout on sys.path) and as `python -m bench.x`, from any folder."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_bench_script_imports_tests():
    offenders = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {name}" for name in names if name == "tests" or name.startswith("tests.")]
    assert offenders == []


def test_a_script_runs_as_a_file_and_as_a_module(tmp_path):
    """From a folder outside the checkout, so that nothing but the bootstrap can find `bench` and `engine`."""
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    as_file = subprocess.run([sys.executable, str(ROOT / "bench" / "launch_stress.py"), "--help"], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=120)
    assert as_file.returncode == 0 and "--seconds" in as_file.stdout, as_file.stderr[-500:]
    as_module = subprocess.run([sys.executable, "-m", "bench.launch_stress", "--help"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=120)
    assert as_module.returncode == 0 and "--seconds" in as_module.stdout, as_module.stderr[-500:]
