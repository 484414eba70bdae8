"""Puts this checkout first on sys.path, for bench scripts run as `python bench/x.py` (how docs/BENCHMARKS.md and the
benchmark rows' `command` field run them): Python then starts the search in bench/, where neither `bench.common`
nor `engine` is found. Run as `python -m bench.x` from the checkout, the scripts need nothing and skip this:

    if not __package__:  # python bench/x.py
        import checkout  # noqa: F401

The checkout is not installed with bench/ as a package on purpose (a top-level `bench` in site-packages would
shadow anyone's), so this is the one place that edits sys.path."""
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path[:1]:
    sys.path.insert(0, ROOT)
